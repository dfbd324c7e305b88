"""A 2-process pre-training job through launch/pretrain.sh (the deepspeed launcher, CPU/gloo) losing a
process, twice, and resuming:

1. rank 1 is SIGKILLed mid-training: rank 0 and the launcher exit promptly, non-zero, with a line
   saying what failed; the newest checkpoint then loses its completion marker (as if the kill had come
   mid-save);
2. the same command is run again: it resumes from the newest *complete* checkpoint; then rank 1 is
   frozen (SIGSTOP: a lost node, nothing closes its sockets): rank 0 gives up after dist_timeout_s
   with a line naming the timeout instead of hanging.

One module-scoped sequence (each launch costs ~30-60 s of start-up on CPU); the tests read its record.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from faults.conftest import Launch, alive, make_teacher, wait_for, write_recipe
from mope_dist.data.synthetic import write_image_text_shards
from mope_dist.distill.checkpoint import MARKER, CheckpointManager

TIMEOUT_S = 20  # a checkpoint save on a busy 2-core box must not outlast it


def complete_tags(run) -> list[str]:
    return CheckpointManager(run / "checkpoints").complete_tags()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed_rank")
    make_teacher(root / "teacher")
    write_image_text_shards(root / "train", num_samples=128, samples_per_shard=32)
    recipe = write_recipe(
        root,
        distill={"steps": 40, "ckpt_every": 2, "keep_checkpoints": 2},
        dist_timeout_s=TIMEOUT_S,
    )
    run = root / "run"
    rec: dict = {}

    # 1. SIGKILL rank 1 once a checkpoint or two exist
    job = Launch(recipe, log=root / "first.log")
    try:
        pid0, pid1 = job.rank_pid(0), job.rank_pid(1)
        wait_for(lambda: (run / "checkpoints" / "step_00000004" / MARKER).exists(), 300, "step 4 saved")
        os.kill(pid1, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not alive(pid0), 60, "rank 0 to exit")
        rec["rank0_exit_s"] = time.monotonic() - killed
        rec["first_rc"] = job.wait(timeout=90)
        rec["launcher_exit_s"] = time.monotonic() - killed
    finally:
        if job.proc.poll() is None:
            job.kill()
    rec["first_log"], rec["pids"] = job.output(), (pid0, pid1)
    tags = complete_tags(run)
    rec["complete_after_kill"] = tags
    # the newest checkpoint loses its marker: an interrupted save that must not be resumed from
    (run / "checkpoints" / tags[-1] / MARKER).unlink()
    rec["expected_resume"] = tags[-2]
    resumed_step = int(tags[-2].split("_")[1])

    # 2. the same command again; once it has saved a new checkpoint, rank 1 freezes
    job = Launch(recipe, log=root / "second.log")
    try:
        pid0, pid1 = job.rank_pid(0), job.rank_pid(1)
        newer = run / "checkpoints" / f"step_{resumed_step + 2:08d}" / MARKER
        wait_for(newer.exists, 300, "a checkpoint of the resumed run")
        os.kill(pid1, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: not alive(pid0), TIMEOUT_S + 60, "rank 0 to give up")
        rec["rank0_gave_up_s"] = time.monotonic() - stopped
        os.kill(pid1, signal.SIGKILL)  # the lost node's processes are gone for good
        rec["second_rc"] = job.wait(timeout=90)
    finally:
        if job.proc.poll() is None:
            job.kill()
    rec["second_log"] = job.output()
    rec["steps"] = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    rec["resumed_step"] = resumed_step
    return rec


def test_killed_rank_ends_the_job_promptly_with_a_reason(record):
    assert record["first_rc"] != 0
    assert record["rank0_exit_s"] < 15 and record["launcher_exit_s"] < 45
    log = record["first_log"]
    pid0, pid1 = record["pids"]
    assert f"rank 1 of 2: pid {pid1}" in log  # maps the launcher's "subprocess <pid>" lines to ranks
    assert (
        "[rank 0] error: a collective operation failed: another process died" in log
        or "[rank 0] received SIGTERM (the launcher stops every rank when one fails" in log
    )
    assert "exits with return code" in log  # the deepspeed launcher's own report


def test_rerun_resumes_from_the_newest_complete_checkpoint(record):
    tags = record["complete_after_kill"]
    assert tags and tags[-1] >= "step_00000004"
    log = record["second_log"]
    assert f"checkpoints/{record['expected_resume']}: step {record['resumed_step']}," in log
    assert "resumed from" in log and f"{tags[-1]} named by" in log  # the unmarked tag was passed over


def test_frozen_rank_makes_the_others_give_up_after_dist_timeout(record):
    assert record["second_rc"] != 0
    assert TIMEOUT_S - 1 <= record["rank0_gave_up_s"] <= TIMEOUT_S + 30
    log = record["second_log"]
    assert "[rank 0] error: a collective operation failed" in log and f"dist_timeout_s={TIMEOUT_S}s" in log


def test_metrics_continue_without_duplicates(record):
    steps = record["steps"]  # steps logged after the resumed checkpoint by the first run were dropped
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > record["resumed_step"]
