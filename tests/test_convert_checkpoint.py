"""tools/convert_checkpoint.py against DeepSpeed's own zero_to_fp32 (ZeRO 1-3), the stage-0 module state,
and the engine's live weights, on checkpoints written by 2 ranks of a real DeepSpeed run.

Run as a script (under torchrun) this file is also the worker that writes those checkpoints.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from faults.conftest import flip_byte

from mope_dist.model import load_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
RUNS = {0: "bf16", 1: "fp32", 2: "bf16", 3: "fp32"}  # ZeRO stage -> precision of the run
TAG = "step_00000002"

_spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def tiny_student():
    from conftest import tiny_open_clip

    from mope_dist.model import KeepSpec, TowerKeep, from_open_clip, slice_model

    teacher = from_open_clip(tiny_open_clip(layers=3))
    keep = KeepSpec(
        vision=TowerKeep(layers=[0, 2], heads={0: [0, 2], 2: [1]}, mlp={2: list(range(0, 256, 3))}),
        text=TowerKeep(layers=[1, 2], heads={1: [3]}),
    )
    return slice_model(teacher, keep)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank training run per ZeRO stage: out/stage{s}/{pruned,checkpoints,final}."""
    out = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def reference_state(run: Path, stage: int) -> dict:
    """What DeepSpeed itself says the weights are: zero_to_fp32, or the stage-0 module state."""
    if stage == 0:
        state = torch.load(run / "checkpoints" / TAG / "mp_rank_00_model_states.pt", weights_only=True)[
            "module"
        ]
        return {k: v.float() for k, v in state.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), TAG)


@pytest.mark.parametrize("stage", sorted(RUNS))
def test_matches_deepspeed(runs, tmp_path, stage):
    run = runs / f"stage{stage}"
    summary = tool.convert(run, tmp_path / "student")  # tag from checkpoints/latest
    assert summary["zero_stage"] == stage and summary["tag"] == TAG and summary["global_steps"] == 2
    ref = reference_state(run, stage)
    got = load_model(tmp_path / "student").state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float().reshape(got[k].shape)), k
    # The trainer's own export (live fp32 master weights): equal, or its bf16 rounding for a stage-0 bf16 run
    # (stage 0 keeps no fp32 master in the checkpoint, only the bf16 working weights).
    final = load_model(run / "final").state_dict()
    for k, v in final.items():
        want = v.to(torch.bfloat16).float() if (stage, RUNS[stage]) == (0, "bf16") else v
        assert torch.equal(got[k], want), k
    pruned = load_model(run / "pruned").state_dict()
    assert any(not torch.equal(pruned[k], got[k]) for k in got), "training steps should have moved weights"
    assert summary["params"]["total"] == sum(v.numel() for k, v in got.items())
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["provenance"]["converted_from"]["zero_stage"] == stage


def test_eval_in_training_equals_converted(runs, tmp_path):
    """Zero-shot eval of the ZeRO-3 student on 2 ranks inside training == the converted model alone."""
    tool.convert(runs / "stage3", tmp_path / "student")
    alone = zeroshot(load_model(tmp_path / "student"))
    during = json.loads((runs / "stage3" / "eval.json").read_text())
    assert alone["n"] == during["n"] == 13
    assert (alone["top1"], alone["top5"]) == (during["top1"], during["top5"])


def test_cli_tag_dtype_and_outputs(runs, tmp_path):
    run = runs / "stage0"
    out = tmp_path / "bf16"
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(run / "checkpoints"), str(out), "--tag", TAG, "--dtype", "bf16"],
        capture_output=True,
        text=True,
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dtype"] == "bf16" and summary["params"]["total"] > 0
    got = load_model(out).state_dict()
    ref = reference_state(run, 0)
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(
            got[k], v.to(torch.bfloat16).reshape(got[k].shape)
        ), k
    # A tag folder is accepted directly; an existing output needs --overwrite; --tag picks an older step.
    tool.convert(run / "checkpoints" / TAG, out, overwrite=True)
    assert load_model(out).state_dict()[next(iter(ref))].dtype == torch.float32
    summary = tool.convert(run, tmp_path / "step1", tag="step_00000001")
    assert summary["global_steps"] == 1
    step1, step2 = load_model(tmp_path / "step1").state_dict(), load_model(out).state_dict()
    assert any(not torch.equal(step1[k], step2[k]) for k in step1)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        tool.main([str(a) for a in argv])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_checkpoint: error: "), lines
    return lines[0]


def test_errors(runs, tmp_path, capsys):
    run = runs / "stage0"
    assert "is not a directory" in _error([tmp_path / "nope", tmp_path / "o"], capsys)
    assert "not a DeepSpeed checkpoint" in _error([tmp_path, tmp_path / "o"], capsys)
    assert "tag 'step9' not found" in _error([run, tmp_path / "o", "--tag", "step9"], capsys)
    (tmp_path / "exists").mkdir()
    assert "already exists" in _error([run, tmp_path / "exists"], capsys)
    # The architecture must be the run's student: the teacher-sized config does not fit.
    from conftest import tiny_open_clip

    from mope_dist.model import from_open_clip

    save_pretrained(from_open_clip(tiny_open_clip(layers=2)), tmp_path / "unpruned")
    msg = _error([run, tmp_path / "o", "--student-config", tmp_path / "unpruned"], capsys)
    assert "does not match the student" in msg and "visual.blocks.0.attn.qkv.weight has shape (96, 64)" in msg
    save_pretrained(from_open_clip(tiny_open_clip(layers=3)), tmp_path / "deeper")
    msg = _error([run, tmp_path / "o", "--student-config", tmp_path / "deeper" / "config.json"], capsys)
    assert "missing tensors (e.g. visual.blocks.2." in msg
    msg = _error([run, tmp_path / "o", "--student-config", tmp_path / "missing"], capsys)
    assert "no student architecture" in msg
    assert not (tmp_path / "o").exists()
    # A save that broke off: files missing (marker present) or no marker beside marked tags.
    ckpts = tmp_path / "ckpts"
    shutil.copytree(run / "checkpoints", ckpts)
    (ckpts / TAG / "mp_rank_00_model_states.pt").write_bytes(b"")
    msg = _error([ckpts, tmp_path / "o", "--student-config", run / "pruned"], capsys)
    assert "is incomplete" in msg
    # A file damaged in place (same size, one byte flipped): named, nothing written.
    shutil.rmtree(ckpts)
    shutil.copytree(run / "checkpoints", ckpts)
    flip_byte(ckpts / TAG / "mp_rank_00_model_states.pt")
    msg = _error([ckpts, tmp_path / "o", "--student-config", run / "pruned"], capsys)
    assert f"{TAG} is incomplete or damaged: mp_rank_00_model_states.pt does not match its CRC-32" in msg
    assert not (tmp_path / "o").exists()
    (ckpts / "step_00000001" / "mope_complete.json").unlink()
    msg = _error(
        [ckpts, tmp_path / "o", "--student-config", run / "pruned", "--tag", "step_00000001"], capsys
    )
    assert "has no mope_complete.json" in msg


class RandomLoader:
    """The trainer's loader protocol over seeded random batches."""

    def __init__(self, rank: int):
        self.rank, self.epoch, self.start = rank, 0, 0

    def __len__(self):
        return 4

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        from conftest import tiny_texts

        for i in range(self.start, len(self)):
            seed = 100 * self.epoch + 10 * i + self.rank
            yield (
                torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),
                tiny_texts(4, seed),
            )

    def skipped(self):
        return {}


def zeroshot(model, rank: int = 0, world: int = 1) -> dict:
    """Zero-shot eval on 13 fixed random images, this rank's strided part (as the labelled loader splits)."""
    from mope_dist.eval import build_classifier, evaluate_zeroshot
    from mope_dist.model import get_tokenizer

    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(13, 3, 32, 32, generator=g), torch.randint(5, (13,), generator=g)
    names = ["red circle", "blue square", "green cross", "cat", "dog"]
    classifier = build_classifier(model, names, ["a photo of a {}.", "{}"], get_tokenizer(model), "cpu")
    images, labels = images[rank::world], labels[rank::world]
    batches = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, len(labels), 3)]
    return evaluate_zeroshot(model, batches, classifier, "cpu", progress=False)


def _worker(out: Path) -> None:
    """Two steps of the project's trainer per ZeRO stage (a checkpoint after each), then its own export."""
    from mope_dist import dist
    from mope_dist.config import DeepSpeedConfig, DistillConfig
    from mope_dist.distill import export_student, train

    info = dist.init_distributed(timeout_s=120, use_deepspeed=True)
    for stage, precision in RUNS.items():
        run = out / f"stage{stage}"
        student = tiny_student()
        if info.is_main:
            save_pretrained(student, run / "pruned")
        cfg = DistillConfig(steps=2, lr=1e-2, warmup_steps=0, ckpt_every=1)  # no teacher: contrastive only
        ds = DeepSpeedConfig(zero_stage=stage, precision=precision)
        evaluate = (lambda m: zeroshot(m, info.rank, info.world_size)) if stage == 3 else None
        result = train(
            student.train(), None, RandomLoader(info.rank), cfg, ds, micro_batch_size=4, output_dir=run,
            dist_info=info, max_skip_rate=1.0, evaluate=evaluate,
        )  # fmt: skip
        export_student(result.engine, run / "final")
        if info.is_main:
            (run / "eval.json").write_text(json.dumps(result.eval))
        dist.barrier()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
