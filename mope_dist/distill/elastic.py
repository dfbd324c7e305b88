"""Resuming on a different number of processes: DeepSpeed's universal checkpoint, converted once.

ZeRO 1-3 (and bf16, whose optimizer partitions like ZeRO-1) save the fp32 master weights and Adam
moments as one partition per data-parallel rank, and DeepSpeed refuses to load them on another number
of ranks. When the tag to resume from has a different number of partitions than the run has processes:
- rank 0 converts it once with DeepSpeed's own `ds_to_universal` (per-parameter fp32 weights, exp_avg,
  exp_avg_sq and step, independent of the partitioning) into `checkpoints/universal/<tag>/`, built in a
  temp dir and renamed into place, so a crash mid-conversion leaves nothing that looks finished; the
  other ranks wait for it (longer than dist_timeout_s: conversion time grows with the model);
- every rank loads it with the engine's universal loader (DeepSpeed's `checkpoint.load_universal`,
  switched on for this load only), which repartitions the state for the new world size.
The module weights, the optimizer step and our client state (train state) come along unchanged; the LR
is a pure function of the step (mope_dist.distill.optim.lr_at). The converted copy is deleted with its
source tag when that is pruned. ZeRO-0 fp32/fp16 tags hold the whole optimizer state in one file and
load on any number of processes as they are.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

from mope_dist import dist
from mope_dist.distill.safe_load import weights_only_loading
from mope_dist.errors import JobError
from mope_dist.utils import atomic_dir, get_logger

log = get_logger("mope_dist.distill")

UNIVERSAL_DIR = "universal"
PARTITION_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
CONVERT_TIMEOUT_S = 4 * 3600.0  # how long the other ranks wait for rank 0's conversion


def saved_world_size(tag_dir: Path) -> int | None:
    """Number of processes that saved the tag, from its optimizer partition files (one per data-parallel
    rank, in DeepSpeed's naming); None for a tag without partitions (ZeRO-0 fp32/fp16)."""
    ranks = {int(m.group(1)) for p in tag_dir.iterdir() if (m := PARTITION_RE.search(p.name))}
    return len(ranks) or None


def convert_to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal of `tag_dir` into `out`, atomically (temp dir + rename); files are
    read with weights_only=True. DeepSpeed's progress output is kept and shown only if it fails."""
    from deepspeed.checkpoint import ds_to_universal

    output = io.StringIO()
    try:
        with atomic_dir(out) as tmp, weights_only_loading():
            args = SimpleNamespace(
                input_folder=str(tag_dir),
                output_folder=str(tmp),
                num_extract_workers=1,  # in this process: no fork of a process holding a process group
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,  # our engine does not add universal_checkpoint_info
            )
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                ds_to_universal.main(args)
        # it also names its output (the temp dir) in a `latest_universal` file beside it: we load by tag
        (out.parent / "latest_universal").unlink(missing_ok=True)
    except Exception as e:
        tail = "\n".join(output.getvalue().strip().splitlines()[-5:])
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(
            f"converting checkpoint {tag_dir} to a universal checkpoint (to resume on a different number "
            f"of processes) failed: {type(e).__name__}: {first}; resume with the number of processes that "
            f"saved it instead. DeepSpeed's last output: {tail!r}"
        ) from e


def universal_load_dir(ckpt_dir: Path, tag: str, saved: int) -> Path:
    """Collective. The directory that holds `tag` as a universal checkpoint: converted by rank 0 the first
    time (one log line saying what and why), reused afterwards. Raises the same JobError on every rank
    if the conversion failed."""
    out = ckpt_dir / UNIVERSAL_DIR
    world = dist.get_world_size()
    group = dist.long_wait_group(CONVERT_TIMEOUT_S)  # collective: before rank 0 starts converting
    error = None
    if dist.is_main():
        if (out / tag).is_dir():
            log.info(
                f"resuming {tag} (saved by {saved} processes) on {world} from its universal copy {out / tag}"
            )
        else:
            log.info(
                f"checkpoint {ckpt_dir / tag} holds ZeRO optimizer state partitioned over {saved} processes "
                f"and this run has {world}: converting it once to a universal checkpoint in {out / tag} "
                "(DeepSpeed ds_to_universal) to resume with the same weights, Adam moments and step"
            )
            for stale in out.glob(f".{tag}.*.tmp"):  # a conversion that was cut short
                shutil.rmtree(stale, ignore_errors=True)
            try:
                convert_to_universal(ckpt_dir / tag, out / tag)
            except JobError as e:
                error = str(e)
    error = dist.broadcast_object(error, group=group)
    if error:
        raise JobError(error)
    return out


@contextlib.contextmanager
def universal_loading(engine, enabled: bool):
    """Within (if `enabled`): engine.load_checkpoint reads a universal checkpoint. DeepSpeed 0.19 reads the
    `checkpoint.load_universal` setting only while loading, so it is switched on for this load alone
    instead of in the config the engine was built with (which must not depend on the resume tag)."""
    if not enabled:
        yield
        return
    config = engine._config
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = saved
