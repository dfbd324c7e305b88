"""Fine-tuning-stage compression (mope_dist.recipes.finetune) on tiny models and generated pairs:

- the staged run through launch/finetune.sh with 2 processes: task teacher -> width -> depth, first
  with only the width stage, then with both (the finished stage and the teacher are not redone);
- in one `torchrun` launch of this file (see `worker`): the other stage orders (depth first,
  one-shot on the text tower alone), a stage interrupted mid-distillation resuming from its
  checkpoint, and consecutive trainings in one process freeing their DeepSpeed engines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HEADS, MLP = 3, 4, 256  # the tiny teacher, both towers


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    return e


def make_setup(root: Path) -> Path:
    """A tiny teacher dir, training shards, proxy and eval pairs, and the recipe; returns its path."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_open_clip

    from mope_dist.data.synthetic import write_image_text_shards, write_retrieval_set
    from mope_dist.model import from_open_clip, save_pretrained

    save_pretrained(from_open_clip(tiny_open_clip(layers=LAYERS, width=64, head_width=16)), root / "teacher")
    train = write_image_text_shards(root / "train", 64, 32)
    write_retrieval_set(root / "proxy", num_images=12, captions_per_image=2, samples_per_shard=12, seed=5)
    write_retrieval_set(root / "pairs", num_images=16, captions_per_image=2, samples_per_shard=16, seed=6)
    recipe = {
        "teacher": {"name": str(root / "teacher")},
        "data": {"train_shards": train, "mode": "resampled", "batch_size": 8, "workers": 0},
        "mope": {
            "neuron_groups": 4,
            "proxy": {"kind": "retrieval", "data": str(root / "proxy" / "000000.tar"), "batch_size": 16},
        },
        "prune": {
            "vision": {"layers": 2, "heads": 2, "mlp": 0.5},
            "text": {"layers": 2, "heads": 2, "mlp": 0.5},
        },
        "distill": {"steps": 2, "warmup_steps": 0, "log_every": 1, "ckpt_every": 1},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "finetune": {"eval_data": str(root / "pairs" / "000000.tar"), "eval_batch_size": 16},
        "dist_timeout_s": 120,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def shapes(model_dir: Path) -> dict:
    spec = json.loads((model_dir / "config.json").read_text())["spec"]
    return {t: {k: spec[t][k] for k in ("heads", "mlp_dims", "source_layers")} for t in ("vision", "text")}


def naive_recall(model_dir: Path, shards: str) -> dict:
    """R@k both ways by brute force: every similarity, every query, one at a time."""
    from mope_dist.data import load_retrieval_set
    from mope_dist.model import create_model_and_transforms, get_tokenizer

    model, _, preprocess = create_model_and_transforms(model_dir)
    images, texts, owner = load_retrieval_set(shards, preprocess, get_tokenizer(model))
    with torch.no_grad():
        sims = (
            F.normalize(model.encode_image(images), dim=-1) @ F.normalize(model.encode_text(texts), dim=-1).T
        )
    out = {}
    for k in (1, 5, 10):
        i2t = [any(owner[j] == i for j in sims[i].topk(k).indices) for i in range(len(images))]
        t2i = [owner[j] in sims[:, j].topk(k).indices for j in range(len(texts))]
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = sum(i2t) / len(i2t), sum(t2i) / len(t2i)
    return out


# ----------------------------------------------------------------------------------------------------
# launch/finetune.sh, 2 processes


def launch(recipe: Path, *overrides: str) -> str:
    cmd = ["bash", str(ROOT / "launch" / "finetune.sh"), str(recipe), *overrides]
    run_env = dict(env(), NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def test_staged_run_resumes_between_stages(tmp_path):
    recipe = make_setup(tmp_path)
    out = tmp_path / "run"
    common = [f"output.dir={out}", "finetune.teacher_steps=2", "finetune.teacher_lr=1.0e-4"]
    common.append(f"output.sync_url=file://{tmp_path / 'mirror'}")
    log = launch(recipe, *common, "finetune.stages=[width]")
    stage0 = out / "stage_0_width"
    for name in ("stage.json", "scores/scores.json", "plan.json", "pruned", "checkpoints/latest", "final"):
        assert (stage0 / name).exists(), name
    assert (out / "teacher" / "final").is_dir() and not (out / "stage_1_depth").exists()
    width = shapes(stage0 / "final")
    for tower in ("vision", "text"):  # width only: every layer kept, each with 2 heads and half its MLP
        assert width[tower] == {
            "heads": [2] * LAYERS,
            "mlp_dims": [MLP // 2] * LAYERS,
            "source_layers": [0, 1, 2],
        }
    scored = json.loads((stage0 / "scores" / "scores.json").read_text())["units"]
    assert {u["kind"] for u in scored} == {"head", "neurons"}

    # the job stopped after stage 0; the same command with both stages continues from there
    stage0_files = [
        out / "teacher/final/model.safetensors",
        *(stage0 / p for p in ("scores/scores.json", "plan.json")),
    ]
    stage0_files += [stage0 / "pruned/model.safetensors", stage0 / "final/model.safetensors"]
    mtimes = [p.stat().st_mtime_ns for p in stage0_files]
    log = launch(recipe, *common, "finetune.stages=[width,depth]")
    assert [p.stat().st_mtime_ns for p in stage0_files] == mtimes
    assert "teacher: reusing" in log and "stage 0 (width): done, reusing" in log
    assert "stage 1 (depth): scoring ['layer']" in log and "stage 0 (width): scoring" not in log

    stage1 = out / "stage_1_depth"
    depth = shapes(stage1 / "final")
    plan = json.loads((stage1 / "plan.json").read_text())["keep"]
    for tower in ("vision", "text"):  # 2 of the 3 width-pruned layers, teacher layer ids composed
        kept = plan[tower]["layers"]
        assert len(kept) == 2 and depth[tower]["source_layers"] == [
            width[tower]["source_layers"][i] for i in kept
        ]
        assert depth[tower]["heads"] == [2, 2] and depth[tower]["mlp_dims"] == [MLP // 2] * 2
    scored = json.loads((stage1 / "scores" / "scores.json").read_text())["units"]
    assert (
        sorted((u["tower"], u["kind"]) for u in scored) == [("text", "layer")] * 3 + [("vision", "layer")] * 3
    )
    provenance = json.loads((stage1 / "final" / "config.json").read_text())["provenance"]
    assert provenance["task_teacher"] == str(out / "teacher" / "final") and provenance["steps"] == 2
    metrics = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss/hidden"] > 0 for m in metrics if "loss/total" in m)  # kept layers vs the teacher's

    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [
        "pre-trained model",
        "task teacher (fine-tuned)",
        "stage 0 width: pruned",
        "stage 0 width: distilled",
        "stage 1 depth: pruned",
        "stage 1 depth: distilled",
    ]
    reference = naive_recall(stage1 / "final", str(tmp_path / "pairs" / "000000.tar"))
    assert {k: rows[-1][k] for k in reference} == pytest.approx(reference, abs=1e-6)
    assert rows[-1]["params"]["total"] < rows[2]["params"]["total"] < rows[1]["params"]["total"]
    assert "| stage 1 depth: distilled |" in (out / "summary.md").read_text()
    # output.sync_url: every training mirrored under its own sub-path, as laid out under output.dir
    for run in ("teacher", "stage_0_width", "stage_1_depth"):
        assert (tmp_path / "mirror" / run / "checkpoints" / "latest").is_file(), run
        assert (tmp_path / "mirror" / run / "metrics.jsonl").is_file(), run
        assert (tmp_path / "mirror" / run / "final" / "model.safetensors").is_file(), run
    for run in ("stage_0_width", "stage_1_depth"):  # what converting their checkpoints needs
        assert (tmp_path / "mirror" / run / "pruned" / "config.json").is_file(), run
    assert not (tmp_path / "mirror" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------
# one torchrun launch of this file: other stage orders, resume mid-distillation, engines freed


def worker(root: Path) -> None:
    """Run under torchrun; every rank writes root/result_<rank>.json."""
    import gc
    import weakref

    import torch.distributed.distributed_c10d as c10d

    from mope_dist import dist
    from mope_dist.config import load_config
    from mope_dist.model import load_model, load_teacher
    from mope_dist.recipes import finetune
    from mope_dist.recipes.builders import train_loader
    from mope_dist.recipes.training import train_and_export

    info = dist.init_distributed(120, use_deepspeed=True)
    recipe = str(root / "recipe.yaml")
    result = {}

    # consecutive trainings in one process, each engine freed before the next starts
    cfg = load_config(recipe)
    _, preprocess, _, tokenizer = load_teacher(str(root / "teacher"))
    loader = train_loader(cfg, preprocess, tokenizer, info.world_size)
    for name, zero, hidden in (
        ("zero1_hidden", 1, 1.0),
        ("zero3", 3, 0.0),
        ("zero1_again", 1, 1.0),
        ("zero3_hidden", 3, 1.0),
    ):
        models = [load_model(root / "teacher"), load_model(root / "teacher")]  # student, teacher
        refs = [weakref.ref(m) for m in models]
        settings = [f"deepspeed.zero_stage={zero}", "distill.steps=1", "distill.losses.embed=0"]
        run_cfg = load_config(recipe, [*settings, f"distill.losses.hidden={hidden}"])
        train_and_export(models.pop(0), models.pop(0), loader, run_cfg, root / "engines" / name, info)
        result[name] = {"freed": [r() is None for r in refs], "process_groups": len(c10d._world.pg_map)}
    result["gc_enabled"] = gc.isenabled()

    # other stage orders, one-shot on the text tower alone
    finetune.main([recipe, f"output.dir={root}/depth_first", "finetune.stages=[depth,width]"])
    text_only = ["prune.vision={layers: null, heads: null, mlp: null}", "finetune.stages=[width+depth]"]
    finetune.main([recipe, f"output.dir={root}/one_shot_text", *text_only])

    # a stage that died after its last checkpoint, before export: rerun resumes from that checkpoint
    if info.is_main:
        import shutil

        shutil.rmtree(root / "depth_first" / "stage_1_width" / "final")
    dist.barrier()
    finetune.main(
        [recipe, f"output.dir={root}/depth_first", "finetune.stages=[depth,width]", "distill.steps=3"]
    )
    (root / f"result_{info.rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("orders")
    make_setup(root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), __file__, str(root)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return root, log, [json.loads((root / f"result_{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("scenario", ["zero1_hidden", "zero3", "zero1_again"])
def test_consecutive_trainings_free_their_engines(worker_run, scenario):
    _, _, results = worker_run
    for rank in results:
        assert rank[scenario]["freed"] == [True, True], (scenario, rank)  # student, teacher
        # DeepSpeed made its groups once, in the first training; none since
        assert rank[scenario]["process_groups"] == rank["zero1_hidden"]["process_groups"]
        assert rank["gc_enabled"]


def test_zero3_with_hidden_loss_frees_its_engine(worker_run):
    _, _, results = worker_run
    assert all(rank["zero3_hidden"]["freed"] == [True, True] for rank in results)


def test_depth_first_and_one_shot_orders(worker_run):
    root, _, _ = worker_run
    depth_first = root / "depth_first"
    final = shapes(depth_first / "stage_1_width" / "final")
    for tower in ("vision", "text"):  # the same final size as width first
        assert final[tower]["heads"] == [2, 2] and final[tower]["mlp_dims"] == [MLP // 2] * 2
    scored = json.loads((depth_first / "stage_0_depth" / "scores" / "scores.json").read_text())["units"]
    assert {u["kind"] for u in scored} == {"layer"} and len(scored) == 2 * LAYERS

    one_shot = root / "one_shot_text"
    assert [p.name for p in sorted(one_shot.glob("stage_*"))] == ["stage_0_width+depth"]
    final = shapes(one_shot / "stage_0_width+depth" / "final")
    assert final["vision"] == {
        "heads": [HEADS] * LAYERS,
        "mlp_dims": [MLP] * LAYERS,
        "source_layers": [0, 1, 2],
    }
    assert final["text"]["heads"] == [2, 2] and final["text"]["mlp_dims"] == [MLP // 2] * 2
    scored = json.loads((one_shot / "stage_0_width+depth" / "scores" / "scores.json").read_text())["units"]
    assert {u["tower"] for u in scored} == {"text"} and {u["kind"] for u in scored} == {
        "head",
        "neurons",
        "layer",
    }
    rows = json.loads((one_shot / "summary.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [
        "teacher",
        "stage 0 width+depth: pruned",
        "stage 0 width+depth: distilled",
    ]


def test_interrupted_stage_resumes_from_its_checkpoint(worker_run):
    root, log, _ = worker_run
    stage1 = root / "depth_first" / "stage_1_width"
    assert "stage 0 (depth): done, reusing" in log and "stage 1 (width): reusing" in log
    assert f"resumed from {stage1 / 'checkpoints' / 'step_00000002'}" in log
    assert json.loads((stage1 / "final" / "config.json").read_text())["provenance"]["steps"] == 3


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
