"""DeepSpeed trainer, 2 processes on CPU (gloo): ZeRO 0-3 steps + checkpoints + export, exact resume,
non-finite loss / gradient skipping. One `torchrun` launch of this file runs every scenario (see
`worker`); the pytest functions below read the JSON each rank writes and assert on it.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
B, BATCHES = 4, 6  # per-rank micro batch, batches per epoch


# ----------------------------------------------------------------------------------------------------
# worker side (runs under torchrun; imports kept inside so pytest collection stays cheap)


class Crash(Exception):
    pass


class RandomLoader:
    """The trainer's loader protocol over seeded random batches; records which batches it produced."""

    def __init__(self, rank, nan_batches=(), crash_at=None, nan_from=None, on_batch=None):
        self.rank, self.nan_batches, self.crash_at, self.nan_from = rank, set(nan_batches), crash_at, nan_from
        self.on_batch = on_batch  # called with the number of batches produced so far
        self.epoch, self.start, self.consumed = 0, 0, []

    def __len__(self):
        return BATCHES

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __iter__(self):
        import torch
        from conftest import tiny_texts

        for i in range(self.start, BATCHES):
            if self.crash_at == (self.epoch, i):
                raise Crash(f"simulated crash at epoch {self.epoch} batch {i}")
            seed = 1000 * self.epoch + 10 * i + self.rank
            images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
            if (self.epoch, i) in self.nan_batches or (
                self.nan_from is not None and (self.epoch, i) >= self.nan_from
            ):
                images[0] = float("nan")
            if self.on_batch is not None:
                self.on_batch(len(self.consumed))
            self.consumed.append([self.epoch, i])
            yield images, tiny_texts(B, seed=seed)

    def skipped(self):
        return {"bad_image": 1 + self.rank, "empty_caption": 0}


def tiny_pair(seed=0):
    """(student, teacher): a tiny open_clip teacher and a student sliced from it (layers/heads/MLP cut)."""
    from conftest import tiny_open_clip

    from mope_dist.model import KeepSpec, TowerKeep, from_open_clip, slice_model

    teacher = from_open_clip(tiny_open_clip(seed=seed, layers=3, width=64, head_width=16))
    keep = KeepSpec(
        vision=TowerKeep(layers=[0, 2], heads={0: [0, 2, 3]}, mlp={2: list(range(0, 256, 2))}),
        text=TowerKeep(layers=[1, 2], heads={1: [1, 2]}),
    )
    return slice_model(teacher, keep).train(), teacher


def run_train(student, teacher, loader, out, info, evaluate=None, mirror_url=None, **settings):
    """train() with the tests' settings: DistillConfig / DeepSpeedConfig keys by name (ZeRO-0 fp32 unless
    given), 2 steps of 2 micro-batches, all four loss terms."""
    from mope_dist.config import DeepSpeedConfig, DistillConfig, LossWeights
    from mope_dist.distill.trainer import train

    ds = DeepSpeedConfig(
        zero_stage=settings.pop("zero_stage", 0), precision=settings.pop("precision", "fp32")
    )
    losses = LossWeights(contrastive=1.0, kd=1.0, kd_temperature=2.0, embed=10.0, hidden=1.0)
    base = dict(steps=2, lr=1e-3, warmup_steps=1, log_every=1, grad_accum=2, losses=losses)
    cfg = DistillConfig(**{**base, **settings})
    return train(
        student, teacher, loader, cfg, ds, micro_batch_size=B, output_dir=out, dist_info=info,
        max_skip_rate=1.0, mirror_url=mirror_url, evaluate=evaluate,
    )  # fmt: skip


def fingerprint(model):
    import torch

    with torch.no_grad():
        return float(sum(p.detach().float().double().sum() for p in model.parameters()))


class FlagAllReduces:
    """While entered, the preemption flag all-reduces train() starts (mope_dist.distill.preempt), and
    which of them it waited for: one left in flight when train() returns can be freed by gloo's thread
    while the interpreter exits, which aborts the process after its results are written."""

    def __init__(self):
        self.started, self.waited = 0, 0

    def __enter__(self):
        from mope_dist.distill import preempt

        recorder, real = self, preempt.tdist

        class Work:
            def __init__(self, work):
                self.work = work

            def wait(self):
                recorder.waited += 1
                return self.work.wait()

        class Collectives:
            def __getattr__(self, name):
                return getattr(real, name)

            def all_reduce(self, *args, **kwargs):
                recorder.started += 1
                return Work(real.all_reduce(*args, **kwargs))

        preempt.tdist = Collectives()
        self.restore = lambda: setattr(preempt, "tdist", real)
        return self

    def __exit__(self, *exc):
        self.restore()


STAGES = ((0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16"), (0, "amp_bf16"), (1, "amp_bf16"))


def suite_stages(out: Path, info, record):
    """ZeRO 0-3: steps, checkpoints (keep 1), export == DeepSpeed's converter, eval sees full weights."""
    import torch
    from conftest import tiny_images, tiny_texts
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mope_dist.distill.engine import export_student
    from mope_dist.model import load_model

    probe_images, probe_texts = tiny_images(2, seed=7), tiny_texts(2, seed=7)
    flag_all_reduces = FlagAllReduces()

    def evaluate(model):
        p = next(model.parameters())
        images, texts = probe_images.to(p.device, p.dtype), probe_texts.to(p.device)
        return {"probe": model.encode_image(images).sum().item() + model.encode_text(texts).sum().item()}

    for stage, precision in STAGES:
        name = f"zero{stage}_{precision}"
        student, teacher = tiny_pair()
        before = fingerprint(student)
        forward_dtypes = set()  # what the student's first MLP computed in, during training
        fc = student.visual.blocks[0].mlp.c_fc
        fc.register_forward_hook(
            lambda m, a, y, seen=forward_dtypes: seen.add(str(y.dtype)) if m.training else None
        )
        run = out / name
        mirror = f"file://{out}/mirror_{name}" if (stage, precision) == (2, "fp32") else None
        with flag_all_reduces:
            result = run_train(
                student, teacher, RandomLoader(info.rank), run, info, evaluate=evaluate, mirror_url=mirror,
                zero_stage=stage, precision=precision, ckpt_every=1, keep_checkpoints=1,
            )  # fmt: skip
        export_student(result.engine, run / "final", provenance={"test": name})
        exported = load_model(run / "final")
        r = {"step": result.state.step, "eval": result.eval, "samples_seen": result.state.samples_seen}
        r["forward_dtypes"], r["weight_dtype"] = sorted(forward_dtypes), str(fc.weight.dtype)
        if info.is_main:
            r["changed"] = abs(fingerprint(exported) - before) > 1e-6
            r["tags"] = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".py"))
            with torch.no_grad():
                r["probe_export"] = (
                    exported.encode_image(probe_images).sum().item()
                    + exported.encode_text(probe_texts).sum().item()
                )
            if stage > 0:
                ref = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000002")
                mine = exported.state_dict()
                diff = [(mine[k].flatten() - ref[k].float().flatten()).abs().max().item() for k in ref]
                r["export_vs_converter"] = max(diff)
                r["export_keys_match"] = sorted(ref) == sorted(mine)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            r["metrics_steps"] = [x["step"] for x in lines if "loss/total" in x]
            r["metrics_keys"] = sorted(set().union(*lines))
            r["skipped_samples"] = [x.get("data/skipped_samples") for x in lines if "loss/total" in x]
            r["tensorboard"] = any((run / "tensorboard").iterdir())
            if mirror:
                m = out / f"mirror_{name}"
                r["mirror"] = sorted(
                    str(p.relative_to(m)) for p in m.rglob("*") if p.is_file() and "tensorboard" not in str(p)
                )
        record[name] = r
    record["flag_all_reduces"] = [flag_all_reduces.started, flag_all_reduces.waited]


def suite_resume(out: Path, info, record):
    """Uninterrupted run vs crash-after-checkpoint + resume: identical weights, LR and data; NaN skipping."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from mope_dist.distill.checkpoint import CheckpointManager
    from mope_dist.distill.engine import full_state_dict

    def run(name, loader, **kw):
        student, teacher = tiny_pair()
        result = run_train(
            student,
            teacher,
            loader,
            out / name,
            info,
            steps=5,
            zero_stage=2,
            ckpt_every=2,
            keep_checkpoints=2,
            **kw,
        )
        return result, student

    # 5 steps x 2 micro-batches = 10 batches: crosses the epoch boundary (6 per epoch); steps 2-3 profiled
    full, full_model = run("full", loader_full := RandomLoader(info.rank), profile_start=1, profile_steps=2)
    profile = out / "full" / "profile"
    record["profile_files"] = sorted(p.name for p in profile.iterdir())
    record["profile_summary"] = json.loads((profile / f"summary_rank{info.rank}.json").read_text())
    record["profile_ops"] = (profile / f"ops_rank{info.rank}.txt").read_text()
    if info.is_main:  # the trace opens as Chrome/Perfetto JSON
        trace = json.loads(gzip.decompress((profile / "trace_rank0.json.gz").read_bytes()))
        record["profile_trace_ops"] = sum(e.get("cat") == "cpu_op" for e in trace["traceEvents"])
    try:  # crash inside step 3's window, after the step-2 checkpoint
        run("crashed", RandomLoader(info.rank, crash_at=(0, 5)))
        record["crashed"] = False
    except Crash:
        record["crashed"] = True
    resumed, resumed_model = run("crashed", loader_resumed := RandomLoader(info.rank))
    record["full_step"], record["resumed_step"] = full.state.step, resumed.state.step
    record["max_param_diff"] = max(
        (a.detach() - b.detach()).abs().max().item()
        for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True)
    )
    record["full_consumed"], record["resumed_consumed"] = loader_full.consumed, loader_resumed.consumed
    if info.is_main:

        def logged(name):
            lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
            return {
                f"{x['step']}/{k}": x[k]
                for x in lines
                if "loss/total" in x
                for k in ("train/lr", "loss/total")
            }

        record["full_log"], record["resumed_log"] = logged("full"), logged("crashed")
        record["resumed_tags"] = sorted(
            p.name for p in (out / "crashed" / "checkpoints").iterdir() if not p.name.endswith(".py")
        )

    # a NaN batch on rank 1 only: the step is skipped on both ranks and counted once; 5 steps still happen
    nan, _ = run("nan", RandomLoader(info.rank, nan_batches={(0, 1)} if info.rank == 1 else set()))
    record["nan_step"], record["nan_skipped"] = nan.state.step, nan.state.skipped_steps
    # NaN from step 3 on: stop after max_nonfinite_steps with a clear error, step-2 checkpoint intact
    try:
        run("all_nan", RandomLoader(info.rank, nan_from=(0, 4)), max_nonfinite_steps=3)
        record["all_nan_error"] = None
    except RuntimeError as e:
        record["all_nan_error"] = str(e)
    record["all_nan_latest"] = CheckpointManager(out / "all_nan" / "checkpoints").latest()

    # finite loss, non-finite gradient at step 1: the optimizer step is skipped, weights stay finite;
    # each call of the torch optimizer's step: whether it changed its parameters or state (under
    # ZeRO-0 it is called on the skipped step too, with the device flag that makes it a no-op)
    for stage in (0, 2, 3):
        student, teacher = tiny_pair()
        poison = {"on": False, "done": False}
        changed = []

        def before(opt, args, kwargs, changed=changed):
            changed.append(optimizer_fingerprint(opt))

        def after(opt, args, kwargs, changed=changed):
            changed[-1] = changed[-1] != optimizer_fingerprint(opt)

        def hook(grad, poison=poison):
            if poison["on"] and not poison["done"]:
                poison["done"] = True
                return grad * float("nan")
            return grad

        next(iter(student.parameters())).register_hook(hook)
        loader = RandomLoader(info.rank, on_batch=lambda n, poison=poison: poison.update(on=n == 1))
        hooks = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
        try:
            result = run_train(
                student, teacher, loader, out / f"nan_grad_zero{stage}", info,
                steps=3, zero_stage=stage, grad_accum=1,
            )  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
        finite = all(torch.isfinite(t).all() for t in full_state_dict(result.engine).values())
        record[f"nan_grad_zero{stage}"] = [
            result.state.step,
            result.state.skipped_steps,
            bool(finite),
            changed,
        ]


def optimizer_fingerprint(opt) -> float:
    """A sum over a torch optimizer's parameters and state tensors (moments, step counts)."""
    import torch

    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        return float(sum(t.detach().double().sum() for t in tensors))


SYNC_RUNS = ((0, "amp_bf16"), (1, "bf16"), (3, "fp32"))  # own clipping; the GPU default; ZeRO-3 hooks


def suite_host_syncs(out: Path, info, record):
    """Host syncs (HostSyncCounter) in steps 2-3 of 4, none of them logging or checkpointing: by site."""
    from mope_dist import dist
    from mope_dist.distill.profile import HostSyncCounter

    note_progress = dist.note_progress
    for stage, precision in SYNC_RUNS:
        counter = HostSyncCounter()

        def progress(counter=counter, **fields):
            note_progress(**fields)
            if fields.get("step") == 1:
                counter.__enter__()
            elif fields.get("step") == 3:
                counter.__exit__(None, None, None)

        dist.note_progress = progress
        try:
            student, teacher = tiny_pair()
            run_train(
                student, teacher, RandomLoader(info.rank), out / f"syncs_zero{stage}_{precision}", info,
                steps=4, grad_accum=1, log_every=4, zero_stage=stage, precision=precision,
            )  # fmt: skip
        finally:
            dist.note_progress = note_progress
        record[f"syncs_zero{stage}_{precision}"] = dict(counter.sites)


def worker(out: str) -> None:
    import torch

    from mope_dist.dist import init_distributed

    torch.manual_seed(0)
    info = init_distributed(use_deepspeed=True)
    record: dict = {}
    suite_stages(Path(out), info, record)
    suite_resume(Path(out), info, record)
    suite_host_syncs(Path(out), info, record)
    Path(out, f"result_rank{info.rank}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------------
# pytest side


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """One 2-process launch runs every scenario (process start-up dominates the cost); per-rank records."""
    out = tmp_path_factory.mktemp("trainer")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions")
        ),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # own session, so that a timeout kills the launcher and both workers together
    proc = subprocess.Popen(
        [*cmd, __file__, str(out)], env=env, cwd=ROOT, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        pytest.fail(f"trainer workers failed (rc {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


RUNS = [f"zero{stage}_{precision}" for stage, precision in STAGES]
FORWARD_DTYPES = {"fp32": ("torch.float32", "torch.float32"), "bf16": ("torch.bfloat16", "torch.bfloat16")}
FORWARD_DTYPES["amp_bf16"] = ("torch.bfloat16", "torch.float32")  # autocast: bf16 matmuls, fp32 weights


@pytest.mark.parametrize("name", RUNS)
def test_zero_stage_steps_checkpoints_and_exports(results, name):
    r0, r1 = results[0][name], results[1][name]
    assert r0["step"] == r1["step"] == 2 and r0["samples_seen"] == 2 * 2 * B * 2
    assert r0["changed"]  # the student was trained
    compute, weights = FORWARD_DTYPES[name.split("_", 1)[1]]
    assert r0["forward_dtypes"] == [compute] and r0["weight_dtype"] == weights
    assert r0["tags"] == ["latest", "step_00000002"]  # keep_checkpoints=1 pruned step 1
    if "export_vs_converter" in r0:  # export == DeepSpeed's own ZeRO -> fp32 converter
        assert r0["export_keys_match"] and r0["export_vs_converter"] < 1e-6
    # the eval callback saw the full weights (gathered under ZeRO-3), on every rank
    tol = (
        0.5 if name.endswith("_bf16") and "amp" not in name else 1e-3
    )  # bf16: the module copy vs the exported fp32 master weights
    assert r0["eval"]["probe"] == pytest.approx(r0["probe_export"], abs=tol)
    assert r1["eval"]["probe"] == pytest.approx(r0["eval"]["probe"], abs=1e-6)
    assert r0["metrics_steps"] == [1, 2] and r0["tensorboard"]
    for key in ("loss/contrastive", "loss/kd", "loss/embed", "loss/hidden", "train/lr", "train/logit_scale"):
        assert key in r0["metrics_keys"]
    assert {
        "perf/samples_per_s",
        "perf/samples_per_s_per_device",
        "perf/data_wait_s",
        "perf/step_time_s",
    } <= set(r0["metrics_keys"])
    assert r0["skipped_samples"] == [3, 3]  # loader counters summed over ranks (1 + 2)


def test_training_leaves_no_flag_all_reduce_in_flight(results):
    for r in results:  # one per step boundary (2 steps x 7 runs), each waited for before train() returns
        assert r["flag_all_reduces"] == [2 * len(STAGES), 2 * len(STAGES)]


def test_mirror_copies_checkpoints_and_logs(results):
    files = results[0]["zero2_fp32"]["mirror"]
    assert "checkpoints/latest" in files and "metrics.jsonl" in files
    assert "checkpoints/step_00000002/mope_complete.json" in files
    assert not any(f.startswith("checkpoints/step_00000001/") for f in files)  # pruned remotely too


def test_resume_continues_exactly(results):
    r0, r1 = results
    assert r0["crashed"] and r0["full_step"] == r0["resumed_step"] == 5
    for r in (r0, r1):
        assert r["max_param_diff"] < 1e-5  # optimizer state, LR and data position all continued
        # the resumed run read exactly the batches the uninterrupted one read after step 2 (no replay)
        assert r["resumed_consumed"] == r["full_consumed"][4:]
    assert r0["resumed_log"] == pytest.approx(r0["full_log"], rel=1e-5)
    assert r0["resumed_tags"] == ["latest", "step_00000004", "step_00000005"]


def test_profile_window_writes_ops_summary_and_trace_without_changing_training(results):
    """distill.profile_steps: steps 2-3 of the uninterrupted run were profiled on both ranks, and that run
    still matches the resumed, unprofiled one (test_resume_continues_exactly)."""
    files = results[0]["profile_files"]
    assert files == [
        "ops_rank0.txt",
        "ops_rank1.txt",
        "summary_rank0.json",
        "summary_rank1.json",
        "trace_rank0.json.gz",
    ]
    for r in results:
        s = r["profile_summary"]
        assert (
            s["steps"] == 2 and s["wall_ms"] > 0 and 0 < s["host_ops_ms"] and s["device_busy_ms"] == 0
        )  # CPU
        assert "Optimizer.step#" in r["profile_ops"] and "aten::" in r["profile_ops"]  # whole steps
    assert results[0]["profile_trace_ops"] > 100


def test_non_finite_loss_is_skipped_and_counted(results):
    r0 = results[0]
    assert r0["nan_step"] == 5 and r0["nan_skipped"] == 1
    # steps 3-5 skipped: the run stops at the third; the step-4 checkpoint, taken between two skipped
    # steps, holds step 2's weights and is the last one
    assert "3 consecutive non-finite losses/gradients up to step 5" in r0["all_nan_error"]
    assert "step_00000004" in r0["all_nan_error"] and r0["all_nan_latest"] == "step_00000004"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_gradients_skip_the_step(results, stage):
    step, skipped, finite, changed = results[0][f"nan_grad_zero{stage}"]
    assert (step, skipped, finite) == (3, 1, True)
    if stage == 0:  # the optimizer ran on the skipped step (the first) and changed nothing
        assert changed == [False, True, True]
    else:  # DeepSpeed does not call it on a skipped step (it calls it per partition group otherwise)
        assert changed and all(changed)


@pytest.mark.parametrize("stage,precision", SYNC_RUNS)
def test_steps_wait_for_the_device_only_where_expected(results, stage, precision):
    """A GPU step should never wait for the device in mope_dist's code (.item(), bool(t), masks): the
    host could not queue the next step meanwhile. ZeRO-0 with fp32 weights (own clipping) has no wait
    at all: its finite-gradient flag stays on the device, where the fused AdamW obeys it. Under ZeRO 1-3
    DeepSpeed reads its overflow checks: listed, not ours to assert. The preemption flag is a CPU
    tensor on a gloo group, read a step after its all-reduce was queued: a host read, never a device one."""
    for r in results:
        sites = r[f"syncs_zero{stage}_{precision}"]
        not_steps = ("mope_dist/distill/preempt.py", "tests/")  # a host read by design; the test's data
        waits = {s: n for s, n in sites.items() if not s.startswith(not_steps)}
        assert not any(s.startswith("mope_dist/") for s in waits), sites
        if stage:
            assert any(site.startswith("deepspeed/") for site in sites), sites  # the counter sees them
        else:
            assert waits == {}, sites


if __name__ == "__main__":
    worker(sys.argv[1])
