"""DeepSpeed checkpoints that are never half-taken, keep-last-K pruning, and an optional remote mirror.

Layout (output_dir/checkpoints/):
    step_00000100/            engine.save_checkpoint files (every rank writes its shards)
        mope_complete.json    written by rank 0 only after every rank finished saving (a barrier)
    step_00000200/ ...
    latest                    the newest complete tag, replaced atomically after the marker

A crash while saving leaves a tag dir without the marker (and `latest` still naming the previous
tag). The marker lists every file with its size and CRC-32 (each rank checksums the files it wrote, in
parallel, right after writing them). Choosing a tag to resume from checks sizes and then
reads every file of that tag against its checksum, so a truncated file or one damaged in place (same
size, flipped bits) is caught: a warning names the file and the newest older intact tag is taken.

A save that fails on any rank (full disk, unwritable directory, I/O error) stops every rank with the
same JobError naming the failing rank(s) and the cause; the half-written tag is removed (freeing its
space) and `latest` keeps naming the previous checkpoint, which is what a rerun resumes from.

Loading never unpickles arbitrary objects (mope_dist.distill.safe_load). A checkpoint saved by a
different number of processes is loaded through DeepSpeed's universal checkpoint
(mope_dist.distill.elastic).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import threading
import time
import traceback
import zlib
from pathlib import Path

from mope_dist import dist
from mope_dist.distill import elastic
from mope_dist.distill.optim import settings_kept
from mope_dist.distill.safe_load import weights_only_loading
from mope_dist.errors import JobError
from mope_dist.utils import atomic_write_json, atomic_write_text, get_logger

log = get_logger("mope_dist.distill")

MARKER = "mope_complete.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")
RANK_FILE_RE = re.compile(r"pp_rank_(\d+)_")  # DeepSpeed's per-rank files (ZeRO partitions)
CHUNK = 8 << 20


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def file_checksum(path: Path) -> dict:
    """{"size", "crc32"} of a file, read in blocks. CRC-32 (zlib) catches flipped bits and torn writes,
    several times faster than blake2b (bench/bench_checksum.py); it is not meant to resist deliberate tampering."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"size": size, "crc32": f"{crc:08x}"}


def _marked_files(tag_dir: Path) -> dict | None:
    """{name: {"size", "crc32"}} from the marker, or None without a readable marker. Markers written
    before checksums were added list sizes only ({name: size}); those files are checked by size."""
    try:
        files = json.loads((tag_dir / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k: v if isinstance(v, dict) else {"size": v} for k, v in files.items()}


def is_complete(tag_dir: Path) -> bool:
    """The marker exists and every file it lists is present with its recorded size (cheap: no reading)."""
    files = _marked_files(tag_dir)
    return files is not None and all(
        (tag_dir / name).is_file() and (tag_dir / name).stat().st_size == entry["size"]
        for name, entry in files.items()
    )


def damaged_file(tag_dir: Path) -> str | None:
    """None if the tag is complete and every file matches its checksum in the marker, else a short
    description of the first problem (naming the file). Reads every file of the tag."""
    files = _marked_files(tag_dir)
    if files is None:
        return f"{MARKER} is missing or unreadable (the save did not finish)"
    for name, entry in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written (truncated?)"
        if "crc32" in entry and file_checksum(path)["crc32"] != entry["crc32"]:
            return f"{name} does not match its CRC-32 in {MARKER} (damaged after it was written)"
    return None


class Mirror:
    """Rank-0 background copy of run artifacts to an fsspec URL (s3://, gs://, file://, memory://).

    Training never waits for it: jobs are queued and a daemon thread copies them in order, a tag's
    marker after its other files (a remote tag that has its marker is whole). A failed copy is logged
    and its paths retried with the next sync; `close()` drains the queue, tries what failed once more,
    and logs an error naming what is still not copied.
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
        files.sort(key=lambda p: p.name == MARKER)  # stable: the marker last
        for f in files:
            remote = f"{self.root}/{f.relative_to(self.local_root).as_posix()}"
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), remote)

    def _copy(self, paths: list[str], delete: list[str]) -> None:
        for rel in paths:
            if (self.local_root / rel).exists():
                self._put(rel)
        for rel in delete:
            if self.fs.exists(f"{self.root}/{rel}"):
                self.fs.rm(f"{self.root}/{rel}", recursive=True)

    def _run(self) -> None:
        paths, delete = [], []  # what failed is tried again with the next job
        while (job := self._jobs.get()) is not None:
            paths, delete = list(dict.fromkeys(paths + job[0])), list(dict.fromkeys(delete + job[1]))
            try:
                self._copy(paths, delete)
                paths, delete = [], []
            except Exception as e:  # a mirror outage must not stop training
                log.warning(
                    f"mirror to {self.root} failed ({type(e).__name__}: {e}); will retry at next sync"
                )
            finally:
                self._jobs.task_done()
        try:
            self._copy(paths, delete)
        except Exception as e:
            log.error(f"mirror to {self.root}: {paths + delete} not copied ({type(e).__name__}: {e})")
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

    def latest(self, verify: bool = True) -> str | None:
        """The tag to resume from: the one `latest` names if it is complete, else the newest complete tag
        before it; None if there is none. With `verify` (choosing where to resume), a tag whose files do
        not match their checksums is passed over with a warning naming the file."""
        named_file = self.dir / "latest"
        named = named_file.read_text().strip() if named_file.is_file() else None
        complete = self.complete_tags()
        if named is not None and named not in complete:
            log.warning(
                f"checkpoint {named} named by {named_file} is incomplete; falling back to an older one"
            )
        if named in complete:  # `latest` lags a newer complete tag only if a save died between the two
            complete = complete[: complete.index(named) + 1]
        for tag in reversed(complete):
            problem = damaged_file(self.dir / tag) if verify else None
            if problem is None:
                return tag
            log.warning(f"checkpoint {self.dir / tag} is damaged: {problem}; falling back to an older one")
        if verify and self._tags():
            log.warning(f"no complete, undamaged checkpoint in {self.dir} to resume from")
        return None

    def save(self, engine, step: int, client_state: dict) -> str:
        """Collective: every rank must call it. Returns the tag; raises JobError on every rank if the
        save failed on any (see the module docstring)."""
        start = time.monotonic()
        tag = step_tag(step)
        tag_dir = self.dir / tag
        main = dist.is_main()
        previous = self.latest(verify=False) if main else None

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

        error, checksums = None, {}
        try:
            checksums = self._checksum_own_files(tag_dir)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        self._check(error, tag, previous)
        gathered = dist.all_gather_object(checksums)

        error = None
        if main:
            try:
                files = {name: entry for part in gathered for name, entry in part.items()}
                for p in sorted(tag_dir.iterdir()):  # any file a rank did not see in its listing
                    if p.is_file() and p.name != MARKER and p.name not in files:
                        files[p.name] = file_checksum(p)
                atomic_write_json(tag_dir / MARKER, {"step": step, "files": dict(sorted(files.items()))})
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
        if main:
            log.info(f"saved checkpoint {tag_dir} in {time.monotonic() - start:.1f}s")
        return tag

    @staticmethod
    def _checksum_own_files(tag_dir: Path) -> dict:
        """Checksums of the files DeepSpeed wrote for this rank (`..pp_rank_<r>_..`); rank 0 also takes
        the shared ones. Read right after writing (from the page cache), in parallel over ranks."""
        rank, world = dist.get_rank(), dist.get_world_size()
        out = {}
        for p in sorted(tag_dir.iterdir()):
            m = RANK_FILE_RE.search(p.name)
            if p.is_file() and p.name != MARKER and (int(m.group(1)) if m else 0) % world == rank:
                out[p.name] = file_checksum(p)
        return out

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
        """After saving `keep_from`: delete all but the newest `keep` complete tags up to it, incomplete
        tags before it, and every tag past it (left by a run that died before naming them `latest`,
        passed over by the resume that led here: this run's future, not its past)."""
        step_of = lambda t: int(TAG_RE.match(t).group(1))  # noqa: E731
        newest, complete = step_of(keep_from), self.complete_tags()
        kept_from = [t for t in complete if step_of(t) <= newest]
        doomed = kept_from[: -self.keep] + [
            t for t in self._tags() if step_of(t) > newest or (t not in complete and step_of(t) < newest)
        ]
        for t in doomed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
            shutil.rmtree(self.dir / elastic.UNIVERSAL_DIR / t, ignore_errors=True)
        return doomed

    def load(self, engine, tag: str) -> dict:
        """Collective: restore module, optimizer and scheduler state; returns the client_state. A tag
        saved by a different number of processes goes through its universal copy (elastic)."""
        saved = elastic.saved_world_size(self.dir / tag)
        universal = saved is not None and saved != dist.get_world_size()
        load_dir = elastic.universal_load_dir(self.dir, tag, saved) if universal else self.dir
        try:
            with (
                weights_only_loading(engine),
                elastic.universal_loading(engine, universal),
                settings_kept(engine.basic_optimizer),
            ):
                path, client_state = engine.load_checkpoint(
                    str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
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
