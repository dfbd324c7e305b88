"""DeepSpeed checkpoints that are never half-taken, keep-last-K pruning, and an optional remote mirror.

Layout (output_dir/checkpoints/):
    step_00000100/            engine.save_checkpoint files (every rank writes its shards)
        mope_complete.json    written by rank 0 only after every rank finished saving (a barrier)
    step_00000200/ ...
    latest                    the newest complete tag, replaced atomically after the marker

A crash while saving leaves a tag dir without the marker (and `latest` still naming the previous
tag); loading verifies the marker and the files it lists (names and sizes, so a truncated file is
caught too), and falls back to the newest complete tag.

A save that fails on any rank (full disk, unwritable directory, I/O error) stops every rank with the
same JobError naming the failing rank(s) and the cause; the half-written tag is removed (freeing its
space) and `latest` keeps naming the previous checkpoint, which is what a rerun resumes from.

Loading never unpickles arbitrary objects: DeepSpeed's checkpoint files are read with
`torch.load(weights_only=True)`, allowing only the few DeepSpeed classes they hold (loss scaler, ZeRO
stage enum, fragment addresses); see `weights_only_loading`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import threading
import traceback
from pathlib import Path

import torch

from mope_dist import dist
from mope_dist.errors import JobError
from mope_dist.utils import atomic_write_json, atomic_write_text, get_logger

log = get_logger("mope_dist.distill")

MARKER = "mope_complete.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    """The marker exists and every file it lists is present with its recorded size."""
    try:
        files = json.loads((tag_dir / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all(
        (tag_dir / name).is_file() and (tag_dir / name).stat().st_size == size for name, size in files.items()
    )


def _ds_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 puts in its checkpoint files (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None, **kwargs):
    """torch.load of a DeepSpeed checkpoint file without arbitrary unpickling (weights_only=True)."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_ds_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


class _SafeTorch:
    """Stands in for the `torch` module inside deepspeed.utils.zero_to_fp32: only `load` differs."""

    load = staticmethod(safe_torch_load)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def weights_only_loading(engine=None):
    """Within: DeepSpeed reads checkpoints with `safe_torch_load` (the engine's checkpoint engine, and
    deepspeed.utils.zero_to_fp32's converter), never with weights_only=False."""
    from deepspeed.utils import zero_to_fp32

    saved_torch = zero_to_fp32.torch
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    zero_to_fp32.torch = _SafeTorch()
    if ckpt_engine is not None:
        ckpt_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location)
    try:
        yield
    finally:
        zero_to_fp32.torch = saved_torch
        if ckpt_engine is not None:
            del ckpt_engine.load  # back to the class's method


class Mirror:
    """Rank-0 background copy of run artifacts to an fsspec URL (s3://, gs://, file://, memory://).

    Training never waits for it: jobs are queued and a daemon thread copies them in order; a failed
    copy is logged and retried at the next sync. `close()` drains the queue at the end of training.
    """

    def __init__(self, url: str, local_root: str | os.PathLike):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        self.local_root = Path(local_root)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mope-mirror", daemon=True)
        self._thread.start()

    def sync(self, paths: list[str], delete: tuple[str, ...] = ()) -> None:
        """Queue a copy of `paths` (files or dirs, relative to local_root), in order, then deletions."""
        self._jobs.put((list(paths), list(delete)))

    def _put(self, rel: str) -> None:
        local = self.local_root / rel
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            remote = f"{self.root}/{f.relative_to(self.local_root).as_posix()}"
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), remote)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            paths, delete = job
            try:
                for rel in paths:
                    if (self.local_root / rel).exists():
                        self._put(rel)
                for rel in delete:
                    if self.fs.exists(f"{self.root}/{rel}"):
                        self.fs.rm(f"{self.root}/{rel}", recursive=True)
            except Exception as e:  # a mirror outage must not stop training
                log.warning(
                    f"mirror to {self.root} failed ({type(e).__name__}: {e}); will retry at next sync"
                )
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class CheckpointManager:
    """Save/find/load tagged DeepSpeed checkpoints in `ckpt_dir`, keeping the newest `keep` complete ones."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep: int = 2, mirror: Mirror | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.mirror = mirror

    def _tags(self) -> list[str]:
        """Tag dirs on disk, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
        return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))

    def complete_tags(self) -> list[str]:
        return [t for t in self._tags() if is_complete(self.dir / t)]

    def latest(self) -> str | None:
        """The tag to resume from: `latest` if complete, else the newest complete tag, else None."""
        named = self.dir / "latest"
        if named.is_file():
            tag = named.read_text().strip()
            if is_complete(self.dir / tag):
                return tag
            log.warning(f"checkpoint {tag} named by {named} is incomplete; falling back to an older one")
        complete = self.complete_tags()
        return complete[-1] if complete else None

    def save(self, engine, step: int, client_state: dict) -> str:
        """Collective: every rank must call it. Returns the tag; raises JobError on every rank if the
        save failed on any (see the module docstring)."""
        tag = step_tag(step)
        tag_dir = self.dir / tag
        main = dist.is_main()
        previous = self.latest() if main else None

        error = None
        if main:  # leftovers of a save that crashed go; the tag dir exists before DeepSpeed writes
            try:
                if tag_dir.exists():
                    shutil.rmtree(tag_dir)
                tag_dir.mkdir(parents=True)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        self._check(error, tag, previous)

        error = None
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:  # noqa: BLE001 - any failure to write (OSError, torch's RuntimeError)
            log.error("saving %s failed on this rank:\n%s", tag, traceback.format_exc())
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            # DeepSpeed's save ends with a barrier every other rank is in (its collectives all come
            # before the writes): join it so that the ranks meet again in the agreement below
            dist.barrier()
        self._check(error, tag, previous)  # every rank's shards are on disk before the marker says so

        error = None
        if main:
            try:
                files = {
                    p.name: p.stat().st_size
                    for p in sorted(tag_dir.iterdir())
                    if p.is_file() and p.name != MARKER
                }
                atomic_write_json(tag_dir / MARKER, {"step": step, "files": files})
                atomic_write_text(self.dir / "latest", tag + "\n")
                removed = self._prune(keep_from=tag)
                if self.mirror is not None:
                    rel = self.dir.relative_to(self.mirror.local_root).as_posix()
                    self.mirror.sync(
                        [f"{rel}/{tag}", f"{rel}/latest"], delete=tuple(f"{rel}/{t}" for t in removed)
                    )
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        # nobody starts the next save (or exits) while rank 0 still prunes
        self._check(error, tag, previous)
        return tag

    def _check(self, error: str | None, tag: str, previous: str | None) -> None:
        """Collective: if any rank failed, rank 0 removes the partial tag and every rank raises the
        same JobError (composed by rank 0, which knows the previous checkpoint)."""
        failed = dist.agree_on_error(error)
        if failed is None:
            return
        message, ranks = failed
        text = None
        if dist.is_main():
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            with contextlib.suppress(OSError):
                if (self.dir / "latest").is_file() and (self.dir / "latest").read_text().strip() == tag:
                    if previous:
                        atomic_write_text(self.dir / "latest", previous + "\n")
                    else:
                        (self.dir / "latest").unlink()
            where = "rank " + ", ".join(map(str, ranks)) if len(ranks) < 8 else f"{len(ranks)} ranks"
            kept = (
                f"the previous checkpoint {previous} is intact and a rerun resumes from it"
                if previous
                else "there is no earlier checkpoint (a rerun starts training from the beginning)"
            )
            text = (
                f"saving checkpoint {tag} in {self.dir} failed on {where} ({message}); the partial {tag} "
                f"was removed and {kept}. Free disk space or fix the output directory, then rerun the "
                "same command."
            )
        raise JobError(dist.broadcast_object(text))

    def _prune(self, keep_from: str) -> list[str]:
        """Delete all but the newest `keep` complete tags, and incomplete tags older than `keep_from`."""
        complete = self.complete_tags()
        newest = int(TAG_RE.match(keep_from).group(1))
        doomed = complete[: -self.keep] + [
            t for t in self._tags() if t not in complete and int(TAG_RE.match(t).group(1)) < newest
        ]
        for t in doomed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        return doomed

    def load(self, engine, tag: str) -> dict:
        """Collective: restore module, optimizer and scheduler state; returns the client_state."""
        try:
            with weights_only_loading(engine):
                path, client_state = engine.load_checkpoint(
                    str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        except Exception as e:
            if dist.is_collective_failure(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise JobError(
                f"checkpoint {self.dir / tag} could not be loaded ({type(e).__name__}: {first}); it was "
                "not written by this run's settings or is damaged: move it out of the way to resume from "
                "the previous complete checkpoint"
            ) from e
        if path is None:
            raise JobError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        return client_state
