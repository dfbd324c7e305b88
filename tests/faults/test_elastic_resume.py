"""Elastic resume: a checkpoint saved by 2 processes loads on 1, and that one's on 2 again, with the same
fp32 master weights, Adam moments and optimizer step (CheckpointManager.load through DeepSpeed's
universal checkpoint, mope_dist.distill.elastic), for ZeRO 0-3 and bf16.

Three torchrun launches of this file (2, 1, 2 processes), each doing every configuration: the first
trains 3 steps and saves `a`; the next ones load the previous tag into a freshly initialised engine and
save it again right away (`b`, then `c`). The reference is computed here, independently of DeepSpeed's
loaders: every parameter's fp32 weights and Adam moments cut out of the partition files of `a` (the
state the 2-process run had before the "restart"), compared with those of `b` and `c`. The model is a
small MLP with two AdamW groups: the mechanism does not depend on the model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"zero0_fp32": (0, "fp32"), "zero1_fp32": (1, "fp32"), "zero1_bf16": (1, "bf16")}
CONFIGS |= {"zero2_fp32": (2, "fp32"), "zero3_fp32": (3, "fp32")}
TAG = "step_00000003"
PHASES = (("a", None, 2), ("b", "a", 1), ("c", "b", 2))  # (saves, loads, processes)


# ----------------------------------------------------------------------------------------------------
# worker side (runs under torchrun)


def worker(root: Path, save: str, load: str | None) -> None:
    import deepspeed

    from mope_dist import dist
    from mope_dist.distill.checkpoint import CheckpointManager

    dist.init_distributed(timeout_s=60, use_deepspeed=True)
    rank = dist.get_rank()
    unsafe_loads, real_load = [], torch.load

    def spy_load(f, *args, **kwargs):  # any torch.load that may unpickle arbitrary objects
        if kwargs.get("weights_only") is False:
            unsafe_loads.append(Path(str(f)).name)
        return real_load(f, *args, **kwargs)

    torch.load = spy_load
    for name, (stage, precision) in CONFIGS.items():
        torch.manual_seed(0 if load is None else 1)  # a loaded run starts from other weights
        model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.LayerNorm(33))
        model.append(torch.nn.Linear(33, 5))
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}], lr=1e-2
        )
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": precision == "bf16"},
            "steps_per_print": 2**31 - 1,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        out = CheckpointManager(root / name / save)
        if load is None:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            for step in range(3):
                x = torch.randn(4, 16, generator=torch.Generator().manual_seed(10 * step + rank))
                engine.backward(engine(x.to(dtype)).float().pow(2).mean())
                engine.step()
            client = {"train_state": {"step": 3}}
        else:
            source = CheckpointManager(root / name / load)
            client = {"train_state": source.load(engine, source.latest())["train_state"]}
        out.save(engine, 3, client)
        if rank == 0:
            record = {"global_steps": engine.global_steps, "train_state": client["train_state"]}
            record["weight_decay"] = [g["weight_decay"] for g in engine.basic_optimizer.param_groups]
            record["unsafe_loads"] = unsafe_loads
            (root / name / f"{save}.json").write_text(json.dumps(record))
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# pytest side


def full_state(tag_dir: Path) -> dict:
    """Every parameter's fp32 weights, exp_avg and exp_avg_sq, cut naively out of the partition files;
    for ZeRO-0 (no partitions) the module and optimizer state as saved."""
    from mope_dist.distill.safe_load import safe_torch_load

    rank_of = lambda p: int(re.search(r"pp_rank_(\d+)_", p.name).group(1))  # noqa: E731
    files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=rank_of)
    if not files:
        saved = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")
        return {"module": saved["module"], "optimizer": saved["optimizer"]}
    parts = [safe_torch_load(f)["optimizer_state_dict"] for f in files]
    keys = ("fp32", "exp_avg", "exp_avg_sq")
    params, steps = {}, set()
    if "fp32_flat_groups" in parts[0]:  # ZeRO-3: each parameter split evenly over the ranks (padded)
        shapes = safe_torch_load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
        flat = []
        for p in parts:
            state = list(p["optimizer_state_dict"]["state"].values())
            steps |= {float(s["step"]) for s in state}
            moments = {k: torch.cat([s[k] for s in state]) for k in keys[1:]}
            flat.append({"fp32": torch.cat(p["fp32_flat_groups"]), **moments})
        offset = 0
        for name, shape in ((n, s) for group in shapes for n, s in group.items()):
            size = -(-shape.numel() // len(parts))
            params[name] = {
                k: torch.cat([f[k][offset : offset + size] for f in flat])[: shape.numel()].view(shape)
                for k in keys
            }
            offset += size
    else:  # ZeRO-1/2 and bf16: each group's flat vector split over the ranks (padded at the end)
        shapes = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")["param_shapes"]
        for g, group in enumerate(shapes):
            states = [p["base_optimizer_state"]["state"][g] for p in parts]
            steps |= {float(s["step"]) for s in states}
            flat = {k: torch.cat([s[k] for s in states]) for k in keys[1:]}
            flat["fp32"] = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
            offset = 0
            for name, shape in group.items():
                params[name] = {k: v[offset : offset + shape.numel()].view(shape) for k, v in flat.items()}
                offset += shape.numel()
    return {"params": params, "steps": steps}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import launcher_env

    root = tmp_path_factory.mktemp("elastic")
    logs = {}
    for save, load, nproc in PHASES:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [__file__, str(root), save, load or ""]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=400
        )  # fmt: skip
        logs[save] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"phase {save} on {nproc} processes failed:\n{logs[save][-6000:]}"
    return root, logs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimizer_state_is_the_same_after_2_to_1_to_2(runs, name):
    root, _ = runs
    reference = full_state(root / name / "a" / TAG)  # the 2-process run's state before the "restart"
    if CONFIGS[name][0] > 0:
        assert reference["steps"] == {3.0} and len(reference["params"]) == 6
    for save in ("b", "c"):
        assert same(full_state(root / name / save / TAG), reference), f"{save} differs from a"
        record = json.loads((root / name / f"{save}.json").read_text())
        assert record == {
            "global_steps": 3,
            "train_state": {"step": 3},
            "weight_decay": [0.1, 0.0],  # each group's own (ZeRO-3's universal load copies group 0's)
            "unsafe_loads": [],  # every DeepSpeed read went through weights_only=True
        }


@pytest.mark.parametrize("name", ["zero1_fp32", "zero1_bf16", "zero2_fp32"])
def test_module_weights_follow_the_restored_master_weights(runs, name):
    from mope_dist.distill.safe_load import safe_torch_load

    root, _ = runs
    module = {
        s: safe_torch_load(root / name / s / TAG / "mp_rank_00_model_states.pt")["module"] for s in "ac"
    }
    assert same(module["a"], module["c"])


def test_conversion_happens_once_per_change_and_says_why(runs):
    root, logs = runs
    for name, (stage, _) in CONFIGS.items():
        for save, load, nproc in PHASES[1:]:
            saved_by = 2 if load == "a" else 1
            line = (
                f"checkpoint {root / name / load / TAG} holds ZeRO optimizer state partitioned over "
                f"{saved_by} processes and this run has {nproc}: converting it once to a universal "
                f"checkpoint in {root / name / load / 'universal' / TAG}"
            )
            assert logs[save].count(line) == (stage > 0), (name, save)
            converted = root / name / load / "universal"
            assert (converted / TAG / "zero").is_dir() == (stage > 0)
            if converted.is_dir():  # nothing half-built is left beside it
                assert sorted(p.name for p in converted.iterdir()) == [TAG]


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no process-group teardown in destructors
