"""Preemption (mope_dist.distill.preempt): SIGTERM makes every rank save a checkpoint at the current step
and exit with one line; a rerun continues from it; a second SIGTERM or an expired grace period exits
without a torn checkpoint; with distill.preempt_grace_s=0 SIGTERM exits at once, as before.

- a 2-process pre-training job under the deepspeed launcher (launch/pretrain.sh, one DataLoader worker
  per rank) gets SIGTERM in every process of the job, as SLURM sends it (the launcher also forwards it
  to each rank's process tree); the same command then continues from the checkpoint, and once more on
  one process (elastic: the ZeRO state is converted to a universal checkpoint); then once more, with
  SIGTERM sent to the launch script alone, as Kubernetes signals a container's PID 1;
- single processes around a CheckpointManager with a stand-in engine whose save can be made slow, for
  the deadline and second-signal cases (started together: interpreter start-up dominates).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults.conftest import REPO, Launch, launcher_env, make_teacher, session_pids, wait_for, write_recipe
from mope_dist.data.synthetic import write_image_text_shards
from mope_dist.distill.checkpoint import CheckpointManager, step_tag

# ----------------------------------------------------------------------------------------------------
# one process: the deadline, a second SIGTERM, a forwarded duplicate, disarmed

PROGRAM = """
import sys, time
from pathlib import Path
import torch
from mope_dist import dist
from mope_dist.distill import preempt
from mope_dist.distill.checkpoint import CheckpointManager, step_tag

dist.install_failure_handlers()
preempt.REPEAT_WINDOW_S = 1.0
run, grace, save_s = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])

class Engine:
    '''engine.save_checkpoint as DeepSpeed lays it out, taking `seconds` between its two files.'''
    def __init__(self, seconds):
        self.seconds = seconds
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 1000)
        time.sleep(self.seconds)
        (Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 1000)

class Batches(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)

ckpt = CheckpointManager(run / "checkpoints")
ckpt.save(Engine(0), 1, {})
preemption = preempt.Preemption(grace)
batches = iter(torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=1))  # forked now
step = 1
print("ready", flush=True)
while not preemption.stop_requested():  # a step boundary
    next(batches)  # fails if the worker died of the SIGTERM
    time.sleep(0.05)
    step += 1
dist.note_progress(step=step)
ckpt.save(Engine(save_s), step, {})
raise preemption.stopped(ckpt.dir / step_tag(step))
"""

CASES = {  # name: (preempt_grace_s, seconds a save takes, SIGTERMs: seconds after "ready")
    "saves": (30, 0, (0.5, 0.6)),  # the second one within REPEAT_WINDOW_S: a launcher forwarding it
    "grace_expires": (3, 60, (0.5,)),
    "second_sigterm": (60, 60, (0.5, 3.0)),
    "disarmed": (0, 0, (0.5,)),
}


@pytest.fixture(scope="module")
def ended(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preempt_one")
    procs = {}
    for name, (grace, save_s, _) in CASES.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, str(root / name), str(grace), str(save_s)],
            cwd=REPO, env=launcher_env(RANK=0, WORLD_SIZE=1), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
    out = {}
    for name, proc in procs.items():
        assert proc.stdout.readline().strip() == "ready", proc.communicate()
        ready = time.monotonic()
        for at in CASES[name][2]:
            time.sleep(max(0.0, ready + at - time.monotonic()))
            os.killpg(proc.pid, signal.SIGTERM)  # the process and its DataLoader worker, as SLURM does
        _, err = proc.communicate(timeout=120)
        mgr = CheckpointManager(root / name / "checkpoints")
        out[name] = {
            "status": proc.returncode,
            "last": err.strip().splitlines()[-1] if err.strip() else "",
            "seconds": time.monotonic() - ready,
            "tags": mgr._tags(),
            "latest": mgr.latest(),
            "dir": mgr.dir,
        }
    return out


def test_sigterm_saves_a_checkpoint_then_exits_with_one_line(ended):
    e = ended["saves"]
    assert e["status"] == 143 and e["latest"] == e["tags"][-1] != step_tag(1)
    step = int(e["latest"].split("_")[1])
    assert e["last"].startswith(f"preempted: checkpoint {e['dir'] / e['latest']} saved ")
    assert "s after SIGTERM (distill.preempt_grace_s=30); rerun the same command" in e["last"]
    assert e["last"].endswith(f"[step {step}, checkpoint {e['dir'] / e['latest']}]")


def test_grace_period_expiry_exits_without_a_torn_checkpoint(ended):
    e = ended["grace_expires"]
    assert e["status"] == 143 and 3 <= e["seconds"] < 30
    assert e["last"].startswith("preempted: grace period of 3s expired before the checkpoint was complete")
    assert len(e["tags"]) == 2 and e["latest"] == step_tag(1)  # the cut-short tag has no marker


def test_second_sigterm_exits_without_a_torn_checkpoint(ended):
    e = ended["second_sigterm"]
    assert e["status"] == 143 and e["seconds"] < 30
    assert e["last"].startswith("preempted: second SIGTERM before the checkpoint was complete")
    assert len(e["tags"]) == 2 and e["latest"] == step_tag(1)


def test_grace_zero_disarms_it(ended):
    e = ended["disarmed"]
    assert e["status"] == 143 and e["tags"] == [step_tag(1)]
    assert e["last"].startswith("received SIGTERM (the launcher stops every rank when one fails")


def test_close_restores_the_previous_handler():
    from mope_dist.distill.preempt import Preemption

    before = signal.getsignal(signal.SIGTERM)
    preemption = Preemption(5)
    assert signal.getsignal(signal.SIGTERM) == preemption._on_sigterm
    preemption.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_preempt_grace_s_must_not_be_negative():
    from mope_dist.config import load_config
    from mope_dist.errors import ConfigError

    assert load_config(None, ["distill.preempt_grace_s=0"]).distill.preempt_grace_s == 0.0
    with pytest.raises(ConfigError, match=r"^distill.preempt_grace_s in the command line: must be >= 0"):
        load_config(None, ["distill.preempt_grace_s=-1"])


# ----------------------------------------------------------------------------------------------------
# 2 processes under the deepspeed launcher, then the same command again, then on 1 process


def logged_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [m["step"] for m in map(json.loads, lines) if "loss/total" in m]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_job")
    make_teacher(root / "teacher")
    write_image_text_shards(root / "train", num_samples=128, samples_per_shard=32)
    recipe = write_recipe(
        root,
        data={"workers": 1},
        distill={"steps": 400, "ckpt_every": 1000, "preempt_grace_s": 25},
        dist_timeout_s=30,
    )
    run, rec = root / "run", {}

    first = Launch(recipe, log=root / "first.log")
    try:
        wait_for(lambda: len(logged_steps(run)) >= 3, 300, "3 training steps")
        os.killpg(first.proc.pid, signal.SIGTERM)  # every process of the job: launcher, ranks, workers
        signalled = time.monotonic()
        first.wait(timeout=60)  # the outer launcher (runner) has no handler on one node: gone at once
        wait_for(lambda: not session_pids(first.proc.pid), 120, "every process of the job to exit")
        rec["exit_s"] = time.monotonic() - signalled
    finally:
        if session_pids(first.proc.pid):
            first.kill()
    rec["first_log"], rec["steps_first"] = first.output(), logged_steps(run)
    rec["complete"] = CheckpointManager(run / "checkpoints").complete_tags()
    preempted = int(rec["complete"][-1].split("_")[1]) if rec["complete"] else 0
    rec["preempted_step"] = preempted

    for name, nproc, steps in (("second", 2, preempted + 2), ("third", 1, preempted + 4)):
        again = Launch(recipe, f"distill.steps={steps}", nproc=nproc, log=root / f"{name}.log")
        rec[f"{name}_rc"] = again.wait(timeout=400)
        rec[f"{name}_log"] = again.output()
    rec["steps"], rec["run"] = logged_steps(run), run

    fourth = Launch(recipe, log=root / "fourth.log")  # distill.steps=400 again: runs until signalled
    try:
        wait_for(lambda: len(logged_steps(run)) >= len(rec["steps"]) + 2, 300, "2 more training steps")
        os.kill(fourth.proc.pid, signal.SIGTERM)  # the script alone
        signalled = time.monotonic()
        rec["fourth_rc"] = fourth.wait(timeout=90)
        rec["fourth_exit_s"] = time.monotonic() - signalled
        rec["fourth_left"] = session_pids(fourth.proc.pid)
    finally:
        if session_pids(fourth.proc.pid):
            fourth.kill()
    rec["fourth_log"], rec["fourth_steps"] = fourth.output(), logged_steps(run)
    rec["fourth_complete"] = CheckpointManager(run / "checkpoints").complete_tags()
    return rec


def test_sigterm_under_the_launcher_checkpoints_the_current_step(job):
    step = job["preempted_step"]
    assert job["complete"] == [step_tag(step)] and step >= 3  # no periodic save (ckpt_every=1000)
    assert job["steps_first"][-1] == step  # the step the ranks agreed on, saved: nothing trained is lost
    log, tag_dir = job["first_log"], job["run"] / "checkpoints" / step_tag(step)
    for rank in (0, 1):
        assert f"[rank {rank}] preempted: checkpoint {tag_dir} " in log
    assert "DataLoader worker" not in log  # the workers got SIGTERM too and ignored it
    assert job["exit_s"] < 60


def test_rerun_continues_from_the_preemption_checkpoint(job):
    step = job["preempted_step"]
    assert job["second_rc"] == 0
    assert f"resumed from {job['run'] / 'checkpoints' / step_tag(step)}: step {step}," in job["second_log"]


def test_rerun_on_one_process_converts_once_and_continues(job):
    step = job["preempted_step"] + 2
    assert job["third_rc"] == 0, job["third_log"][-3000:]
    log, tag_dir = job["third_log"], job["run"] / "checkpoints" / step_tag(step)
    assert f"{tag_dir} holds ZeRO optimizer state partitioned over 2 processes and this run has 1" in log
    assert f"resumed from {tag_dir}: step {step}," in log
    assert job["steps"] == list(range(1, step + 3))  # every step once, across the three runs


def test_sigterm_to_the_launch_script_alone_reaches_the_ranks(job):
    """Kubernetes: SIGTERM to PID 1 only. The script passes it on, outlives the ranks' save, exits 143."""
    step = job["fourth_steps"][-1]
    assert job["fourth_complete"][-1] == step_tag(step) and step > job["steps"][-1]
    tag_dir = job["run"] / "checkpoints" / step_tag(step)
    for rank in (0, 1):
        assert f"[rank {rank}] preempted: checkpoint {tag_dir} " in job["fourth_log"]
    assert job["fourth_rc"] == 143 and job["fourth_left"] == [] and job["fourth_exit_s"] < 60
