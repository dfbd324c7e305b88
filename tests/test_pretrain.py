"""The whole pre-training job through launch/pretrain.sh: 2 CPU processes, tiny teacher, generated shards."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import free_port, launcher_env, tiny_open_clip

from mope_dist.data.synthetic import write_image_text_shards, write_labelled_set
from mope_dist.model import KeepSpec, count_params, from_open_clip, load_model, save_pretrained, slice_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny teacher dir, shards, a labelled set and a recipe; the first run of the job."""
    root = tmp_path_factory.mktemp("pretrain")
    teacher = from_open_clip(tiny_open_clip(layers=2, width=64, head_width=16))
    save_pretrained(teacher, root / "teacher")
    shards = write_image_text_shards(root / "train", num_samples=256, samples_per_shard=64)
    write_labelled_set(root / "val", per_class=1)
    recipe = {
        "teacher": {"name": str(root / "teacher")},
        "data": {"train_shards": shards, "mode": "resampled", "batch_size": 16, "workers": 0},
        "mope": {
            "neuron_groups": 4,
            "proxy": {
                "data": str(root / "val"),
                "classnames": str(root / "val" / "classnames.txt"),
                "templates": "simple",
                "batch_size": 32,
            },
        },
        "prune": {"vision": {"layers": 1, "heads": 0.5, "mlp": 0.5}, "text": {"heads": 2, "mlp": 128}},
        "distill": {"steps": 4, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2, "keep_checkpoints": 2},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "output": {"dir": str(root / "run")},
        "dist_timeout_s": 60,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = run_job(root / "recipe.yaml")
    assert proc.returncode == 0, proc.stdout[-4000:]
    return root, proc


def run_job(recipe: Path, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = launcher_env(NPROC_PER_NODE=2, MASTER_PORT=free_port())
    cmd = ["bash", "launch/pretrain.sh", str(recipe), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_job_writes_every_artifact_and_a_loadable_student(job):
    root, proc = job
    run = root / "run"
    for path in (
        "config.yaml",
        "scores/scores.json",
        "plan.json",
        "pruned/config.json",
        "final/model.safetensors",
    ):
        assert (run / path).exists(), path
    assert list((run / "scores").glob("*.png")), "heatmaps"
    assert list((run / "tensorboard").iterdir())

    scores = json.loads((run / "scores" / "scores.json").read_text())
    kinds = {(u["tower"], u["kind"]) for u in scores["units"]}
    assert kinds == {(t, k) for t in ("vision", "text") for k in ("head", "neurons", "layer")}

    plan = json.loads((run / "plan.json").read_text())
    teacher = load_model(root / "teacher")
    expected = slice_model(teacher, KeepSpec.from_dict(plan["keep"]))
    final = load_model(run / "final")
    measured = sum(p.numel() for p in final.parameters())
    assert measured == count_params(expected)["total"] == count_params(final)["total"]
    assert final.spec.vision.heads == [2] and final.spec.text.heads == [2, 2]
    assert final.spec.text.mlp_dims == [128, 128]
    assert final.spec.vision.source_layers == plan["keep"]["vision"]["layers"]

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss/total" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for term in ("contrastive", "kd", "embed", "hidden"):
        assert all(m[f"loss/{term}"] == m[f"loss/{term}"] for m in steps), term  # logged and finite
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("4")
    assert "teacher" in proc.stdout and "pruned" in proc.stdout  # the before/after table


def test_rerun_reuses_phases_and_resumes_training(job):
    root, _ = job
    run = root / "run"
    scores_mtime = (run / "scores" / "scores.json").stat().st_mtime
    # resumed with the JPEGs decoded by the trainer (data.decode=device, here on the CPU): the data
    # position does not depend on where images are decoded
    proc = run_job(root / "recipe.yaml", "distill.steps=6", "data.decode=device")
    assert proc.returncode == 0, proc.stdout[-4000:]
    log = proc.stdout + proc.stderr
    assert "scores: reusing" in log and "prune: reusing" in log
    assert (run / "scores" / "scores.json").stat().st_mtime == scores_mtime
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines if "loss/total" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued at step 5, nothing repeated
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("6")


def test_run_dir_of_another_config_is_refused(job):
    root, _ = job
    proc = run_job(root / "recipe.yaml", "prune.text.heads=1", timeout=120)
    assert proc.returncode != 0
    assert "output.dir" in proc.stderr + proc.stdout and "prune" in proc.stderr + proc.stdout


def test_bad_config_exits_2_before_launching(tmp_path):
    (tmp_path / "bad.yaml").write_text("distill:\n  stepz: 1\n")
    proc = run_job(tmp_path / "bad.yaml", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "unknown key distill.stepz" in proc.stderr


def test_two_simulated_nodes_form_one_job(job, tmp_path):
    """Two launcher invocations on loopback (NODE_RANK 0/1, one process each) train as one 2-rank job."""
    root, _ = job
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    out = tmp_path / "run"
    # finite mode: the shuffled shard list is split by rank, i.e. between the two nodes
    cmd = [
        "bash",
        "launch/pretrain.sh",
        str(root / "recipe.yaml"),
        f"output.dir={out}",
        "distill.steps=2",
        "data.mode=finite",
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=launcher_env(
                HOSTFILE=hostfile, NODE_RANK=rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "rank 0 of 2" in logs[0] and "rank 1 of 2" in logs[1]
    assert (out / "final" / "model.safetensors").exists()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss/total" in m] == [1, 2]
