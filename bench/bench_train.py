"""Training throughput and memory of mope_dist.distill.trainer against baselines measured in the same run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_train.py [--nproc 2] [--parts distill,openclip,memory]
    python bench/bench_train.py --nproc 1 --parts distill --model ViT-B-16 --batch 256 --precision bf16  # GPU

- distill: samples/s of `train()` (DeepSpeed, teacher + all four loss terms) vs a plain PyTorch
  DDP loop doing the same student forward/backward, teacher forward, loss and AdamW step on the same
  batches with the same process count. Goal: ratio >= 0.9.
- openclip: contrastive-only samples/s of `train()` vs open_clip_train.train.train_one_epoch on the
  same architecture, weights and batches. Goal: ratio >= 1.0. (open_clip_train's own data module needs
  pandas; this bench passes it in-memory batches and never imports that module.)
- memory: peak memory per rank for ZeRO 0/1/2/3 (a fresh launch per stage): peak RSS, its growth
  over the RSS before deepspeed.initialize, and on CUDA torch.cuda.max_memory_allocated.

Each part runs as one `torchrun` launch of this file; both sides of a ratio run in that same launch
on the same batches, after warm-up steps, over the same number of timed steps, in alternating rounds
(best round of each side reported, since the load of a shared machine drifts).

`--model NAME` runs the throughput parts on any open_clip model (random weights, nothing downloaded)
instead of the built-in mid-size CLIP; `--model tiny` runs a CLIP so small that a step is nearly all
host work, so its ratio is the trainer's per-step host overhead over the plain loop. `--compile`
applies to both sides (the baselines compile when the trainer does). MFU (model FLOPs utilisation) is
printed beside each side: the analytic FLOPs per sample (mope_dist.model.train_flops_per_sample) x samples/s over the device's peak
(`--peak-tflops`, default from PEAK_TFLOPS by the GPU's name; none on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}

# Mid-size CLIP for the throughput parts (compute, not Python overhead, should dominate a step).
MODEL = dict(
    embed_dim=256,
    vision_cfg=dict(image_size=64, patch_size=8, width=256, layers=6, head_width=32, mlp_ratio=4.0),
    text_cfg=dict(context_length=32, vocab_size=49408, width=256, heads=8, layers=6, mlp_ratio=4.0),
)
# `--model tiny`: a step that is nearly all host work (Python, op dispatch), so the ratio shows the
# trainer's per-step host overhead over the plain loop, which a GPU hides only while it has queued work.
TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=6, head_width=16, mlp_ratio=1.0),
    text_cfg=dict(context_length=8, vocab_size=49408, width=32, heads=2, layers=6, mlp_ratio=1.0),
)


def _arch(opts) -> dict | str:
    """The throughput parts' model: the built-in mid-size CLIP, TINY, or an open_clip model name."""
    return {None: MODEL, "tiny": TINY}.get(opts.model, opts.model)


def _open_clip_model(cfg: dict | str, seed: int = 0, output_dict: bool = False):
    """An open_clip model with random weights from a model_cfg dict or an open_clip model name."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    if isinstance(cfg, str):
        return open_clip.create_model(cfg, output_dict=output_dict)
    return open_clip.CLIP(**cfg, output_dict=output_dict)


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's peak for MFU: `override`, else PEAK_TFLOPS by name, else None (MFU not printed)."""
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def format_mfu(samples_per_s: float, flops_per_sample: float, peak: float | None) -> str:
    return f"{samples_per_s * flops_per_sample / (peak * 1e12):.1%}" if peak else "n/a"


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _student_teacher(cfg: dict):
    """Teacher imported from open_clip; student keeps every other layer and 3/4 of the heads/neurons."""
    from mope_dist.model import KeepSpec, TowerKeep, from_open_clip, slice_model

    teacher = from_open_clip(_open_clip_model(cfg).eval())
    keep = {}
    for name in ("vision", "text"):
        tower = getattr(teacher.spec, name)
        layers = list(range(0, tower.num_layers, 2))
        heads = {i: list(range(tower.heads[i] * 3 // 4)) for i in layers}
        mlp = {i: list(range(tower.mlp_dims[i] * 3 // 4)) for i in layers}
        keep[name] = TowerKeep(layers=layers, heads=heads, mlp=mlp)
    return slice_model(teacher, KeepSpec(**keep)).train(), teacher


class Batches:
    """The trainer's loader protocol over a fixed list of in-memory batches (cycled)."""

    def __init__(self, batches: list):
        self.batches = batches
        self.start = 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.start = start_step

    def __iter__(self):
        yield from self.batches[self.start :]

    # open_clip_train's DataInfo / dataloader attributes
    @property
    def num_batches(self):
        return len(self.batches)

    @property
    def num_samples(self):
        return sum(len(b[0]) for b in self.batches)


def _batches(n: int, batch: int, cfg: dict | str, rank: int, device) -> list:
    """Random batches already on the device, so neither side of a ratio pays the copy."""
    import open_clip
    import torch

    g = torch.Generator().manual_seed(1234 + rank)
    cfg = open_clip.get_model_config(cfg) if isinstance(cfg, str) else cfg
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"].get("context_length", 77)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, size, size, generator=g)
        texts = torch.randint(1, 49406, (batch, ctx), generator=g)
        texts[:, 0], texts[:, ctx // 2] = 49406, 49407  # SOT ... EOT (argmax pooling), rest random
        texts[:, ctx // 2 + 1 :] = 0
        out.append((images.to(device), texts.to(device)))
    return out


def _trainer_samples_per_s(out_dir: Path, student, teacher, loader, settings, info) -> float:
    """Steady-state samples/s as logged by the trainer: the second of its log windows (a third, partial
    one holds the profiled steps, if any)."""
    from mope_dist.distill.trainer import train

    cfg, ds, batch = settings
    train(
        student,
        teacher,
        loader,
        cfg,
        ds,
        micro_batch_size=batch,
        output_dir=out_dir,
        dist_info=info,
        max_skip_rate=1.0,
    )
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [x["perf/samples_per_s"] for x in lines if "perf/samples_per_s" in x]
    return windows[1]


def _settings(opts, steps: int, batch: int, zero_stage: int | None = None, profile: int = 0):
    """(DistillConfig, DeepSpeedConfig, micro batch) of a trainer run: `steps` warm-up then `steps` timed,
    one log window each, then `profile` profiled steps (distill.profile_steps); all four loss terms when the run has a teacher (contrastive only without)."""
    from mope_dist.config import DeepSpeedConfig, DistillConfig, LossWeights

    losses = LossWeights(contrastive=1.0, kd=1.0, kd_temperature=2.0, embed=100.0, hidden=1.0)
    compile_ = {"auto": None, "on": True, "off": False}[opts.compile]
    cfg = DistillConfig(
        steps=2 * steps + profile,
        profile_start=2 * steps,
        profile_steps=profile,
        lr=1e-4,
        warmup_steps=2,
        log_every=steps,
        losses=losses,
        compile=compile_,
    )
    zero = opts.zero if zero_stage is None else zero_stage
    return cfg, DeepSpeedConfig(zero_stage=zero, precision=opts.precision), batch


def _autocast(opts, device):
    """The plain loops' counterpart of DeepSpeed bf16 / amp_bf16: fp32 weights, bf16 autocast."""
    import contextlib

    import torch

    if opts.precision in ("bf16", "amp_bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compile_like_the_trainer(opts, device, *modules) -> None:
    """The baselines compile (in place) when the trainer does (distill.compile; auto: on with CUDA), so
    each ratio compares compiled with compiled, or with --compile off eager with eager."""
    if {"on": True, "off": False}.get(opts.compile, device.type == "cuda"):
        for module in modules:
            module.compile()


def _alternate(opts, baseline, trainer) -> tuple[list[float], list[float]]:
    """Run baseline(round) and trainer(round) `opts.rounds` times each, alternating which goes first:
    the load of a shared machine drifts, so each side reports its best round."""
    base, ours = [], []
    for r in range(opts.rounds):
        for fn, acc in ((baseline, base), (trainer, ours))[:: 1 if r % 2 == 0 else -1]:
            acc.append(fn(r))
    return base, ours


def part_distill(info, opts, out: Path) -> dict:
    """train() vs a plain DDP loop: same student fwd/bwd, teacher fwd, losses, AdamW, clipping."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mope_dist.distill.losses import HiddenRecorder, make_loss
    from mope_dist.distill.optim import lr_at, make_optimizer, set_lr
    from mope_dist.distill.profile import StepProfiler
    from mope_dist.model import train_flops_per_sample

    device, model = info.device, _arch(opts)
    batches = _batches(opts.steps, opts.batch, model, info.rank, device)
    settings = _settings(opts, opts.steps, opts.batch)
    cfg = settings[0]

    # plain PyTorch: DDP student, frozen teacher (bf16 on GPU, like the trainer's), the same loss, AdamW
    student, teacher = _student_teacher(model)
    student.to(device)
    teacher.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False)
    loss_fn = make_loss(cfg, student, teacher)
    s_rec, t_rec = HiddenRecorder(student), HiddenRecorder(teacher)
    _compile_like_the_trainer(opts, device, student, teacher)
    ddp = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(student, cfg)

    def plain_step(step: int) -> None:
        images, texts = batches[step % len(batches)]
        set_lr(optimizer, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr))
        with torch.no_grad():
            t_out = t_rec(teacher, images.to(teacher.logit_scale.dtype), texts)
        with _autocast(opts, device):
            loss, _ = loss_fn(s_rec(ddp, images, texts), t_out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()

    # --profile N: the last round of each side profiles N more steps after its timed ones
    profiles, last = {}, opts.rounds - 1

    def plain(r) -> float:
        for step in range(2 * opts.steps):  # the first half warms up
            if step == opts.steps:
                torch.distributed.barrier()
                t0 = time.perf_counter()
            plain_step(step)
        torch.distributed.barrier()
        rate = opts.steps * opts.batch * info.world_size / (time.perf_counter() - t0)
        if opts.profile and r == last:
            profiler = StepProfiler(0, opts.profile, device, out / "profile_baseline" / "profile", info.rank)
            profiler.open()
            for step in range(2 * opts.steps, 2 * opts.steps + opts.profile):
                plain_step(step)
            profiles["baseline"] = profiler.close_window()
        return rate

    def trainer(r) -> float:
        s, t = _student_teacher(model)
        if not (opts.profile and r == last):
            return _trainer_samples_per_s(out / f"distill_{r}", s, t, Batches(batches), settings, info)
        profiled = _settings(opts, opts.steps, opts.batch, profile=opts.profile)
        rate = _trainer_samples_per_s(out / "profile_trainer", s, t, Batches(batches), profiled, info)
        summary = out / "profile_trainer" / "profile" / f"summary_rank{info.rank}.json"
        profiles["trainer"] = json.loads(summary.read_text())
        return rate

    flops = train_flops_per_sample(student, teacher)
    base, ours = _alternate(opts, plain, trainer)
    result = {"trainer": ours, "baseline": base, "ratio": max(ours) / max(base), "flops_per_sample": flops}
    if profiles:
        result["profile"] = profiles
    return result


def part_openclip(info, opts, out: Path) -> dict:
    """Contrastive only: train() vs open_clip_train.train.train_one_epoch, same weights and batches."""
    from types import SimpleNamespace

    import torch
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mope_dist.model import from_open_clip, train_flops_per_sample

    arch = _arch(opts)
    batches = _batches(opts.steps, opts.batch, arch, info.rank, info.device)
    model = _open_clip_model(arch, output_dict=True).to(info.device)

    # open_clip_train's setup (main.py): DDP, AdamW with its exclude rule, cosine_lr, ClipLoss
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=1e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = cosine_lr(optimizer, 1e-4, 2, 2 * opts.steps * opts.rounds)
    loss = ClipLoss(cache_labels=True, rank=info.rank, world_size=info.world_size)
    oc_args = SimpleNamespace(
        device=str(info.device), precision="fp32" if opts.precision == "fp32" else "amp_bf16", distill=False,
        accum_freq=1, skip_scheduler=False, horovod=False, grad_clip_norm=1.0, log_every_n_steps=10**9,
        batch_size=opts.batch, world_size=info.world_size, rank=info.rank, local_rank=info.local_rank,
        wandb=False,
    )  # fmt: skip
    data = {"train": SimpleNamespace(dataloader=Batches(batches), set_epoch=lambda epoch: None)}
    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    _compile_like_the_trainer(opts, info.device, ddp)  # open_clip_train --torchcompile compiles the DDP model

    def open_clip_train(r) -> float:
        train_one_epoch(ddp, data, loss, 2 * r, optimizer, None, scheduler, None, oc_args)  # warm-up epoch
        torch.distributed.barrier()
        t0 = time.perf_counter()
        train_one_epoch(ddp, data, loss, 2 * r + 1, optimizer, None, scheduler, None, oc_args)
        torch.distributed.barrier()
        return opts.steps * opts.batch * info.world_size / (time.perf_counter() - t0)

    def trainer(r) -> float:
        student = from_open_clip(_open_clip_model(arch)).train()  # the same initial weights (same seed)
        settings = _settings(opts, opts.steps, opts.batch)
        return _trainer_samples_per_s(out / f"openclip_{r}", student, None, Batches(batches), settings, info)

    flops = train_flops_per_sample(from_open_clip(_open_clip_model(arch)).spec)
    base, ours = _alternate(opts, open_clip_train, trainer)
    return {"trainer": ours, "baseline": base, "ratio": max(ours) / max(base), "flops_per_sample": flops}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def part_memory(info, opts, out: Path) -> dict:
    """One ZeRO stage (fresh processes): memory of a contrastive run of a ViT-B/32-sized CLIP.

    Peak RSS includes transients of engine construction (flattening copies) and checkpoint saving;
    "held" is what the live engine keeps after training (model, gradients, optimizer state)."""
    import gc

    import open_clip
    import torch

    from mope_dist.distill.trainer import train
    from mope_dist.model import from_open_clip

    cfg = open_clip.get_model_config(opts.memory_model)
    model = from_open_clip(_open_clip_model(cfg)).train()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    batches = _batches(2, opts.memory_batch, cfg, info.rank, info.device)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    cfg, ds, batch = _settings(opts, 1, opts.memory_batch, zero_stage=opts.stage)
    result = train(
        model, None, Batches(batches), cfg, ds, micro_batch_size=batch,
        output_dir=out / f"memory_zero{opts.stage}", dist_info=info, max_skip_rate=1.0,
    )  # fmt: skip
    gc.collect()
    r = {
        "params_m": params_m,
        "peak_rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
        "held_rss_growth_mb": _rss_mb() - before,
    }
    if cuda:
        r["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        r["cuda_held_mb"] = torch.cuda.memory_allocated() / 2**20
    del result
    return r


def worker(opts) -> None:
    import torch

    from mope_dist.dist import init_distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    info = init_distributed(use_deepspeed=True)
    out = Path(opts.out)
    result = {"distill": part_distill, "openclip": part_openclip, "memory": part_memory}[opts.part](
        info, opts, out
    )
    result["device"] = _device_name(info.device)
    Path(out, f"{opts.part}{opts.stage if opts.part == 'memory' else ''}_rank{info.rank}.json").write_text(
        json.dumps(result)
    )


def launch(opts, part: str, out: Path, stage: int = 0) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(opts.nproc)]
    cmd += [__file__, "--worker", "--part", part, "--out", str(out), "--stage", str(stage)]
    cmd += ["--steps", str(opts.steps), "--batch", str(opts.batch), "--zero", str(opts.zero)]
    cmd += ["--precision", opts.precision, "--rounds", str(opts.rounds), "--compile", opts.compile]
    cmd += ["--memory-model", opts.memory_model, "--memory-batch", str(opts.memory_batch)]
    cmd += ["--profile", str(opts.profile)]
    cmd += ["--model", opts.model] if opts.model else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{part} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    name = f"{part}{stage if part == 'memory' else ''}"
    return [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(opts.nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--parts", default="distill,openclip,memory")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after as many warm-up steps)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; the best is reported")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage of the trainer in the throughput parts")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "amp_bf16"])
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile of both sides: the trainer's distill.compile, the baselines' models (auto: on GPU)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="open_clip model name for the throughput parts (random weights), or tiny (host overhead)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="distill part: torch.profiler over N more steps of each side's last round (wall, device busy, host "
        "ms per step; top operators and a trace in OUT/profile_*/profile/)",
    )
    p.add_argument("--memory-model", default="ViT-B-32")
    p.add_argument("--memory-batch", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        return worker(opts)

    out = Path(opts.out or tempfile.mkdtemp(prefix="bench_train_"))
    parts = opts.parts.split(",")
    print(
        f"bench_train: {opts.nproc} processes, batch {opts.batch}/rank, {opts.steps} timed steps, "
        f"model {opts.model or 'built-in mid-size CLIP'}, {opts.precision}, compile {opts.compile}, out {out}"
    )
    for part, baseline, goal in (("distill", "plain DDP loop", 0.9), ("openclip", "open_clip_train", 1.0)):
        if part in parts:
            r = launch(opts, part, out)[0]
            rounds = " ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(r["trainer"], r["baseline"], strict=True))
            peak = peak_tflops(r["device"], opts.peak_tflops)
            mfu = [format_mfu(max(r[k]), r["flops_per_sample"], peak) for k in ("trainer", "baseline")]
            print(
                f"{part:9s} trainer {max(r['trainer']):8.1f} samples/s | {baseline} {max(r['baseline']):8.1f} "
                f"samples/s | ratio {r['ratio']:.3f} (goal >= {goal}) | MFU {mfu[0]} / {mfu[1]} "
                f"({r['device']}, peak {peak or '?'} TFLOP/s) [rounds trainer/baseline: {rounds}]"
            )
            for side, pr in r.get("profile", {}).items():
                busy = pr["device_busy_ms"]
                print(
                    f"  profile {side:8s} {pr['steps']} steps: {pr['wall_ms']:.1f} ms/step wall, device busy "
                    f"{busy:.1f} ms ({busy / pr['wall_ms']:.0%}), host operators {pr['host_ops_ms']:.1f} ms "
                    f"(top operators, trace: {out}/profile_{side}/profile/)"
                )
    if "memory" in parts:
        print(
            f"memory ({opts.memory_model}, batch {opts.memory_batch}/rank, contrastive, {opts.precision}, AdamW), per rank:"
        )
        for stage in range(4):
            ranks = launch(opts, "memory", out, stage)
            cells = []
            for i, r in enumerate(ranks):
                cell = f"rank{i}: RSS +{r['held_rss_growth_mb']:5.0f} MB held, +{r['peak_rss_growth_mb']:5.0f} MB peak"
                if "cuda_max_allocated_mb" in r:
                    cell += (
                        f"; CUDA {r['cuda_held_mb']:5.0f} MB held, {r['cuda_max_allocated_mb']:5.0f} MB peak"
                    )
                cells.append(cell)
            print(f"  ZeRO-{stage} ({ranks[0]['params_m']:.0f}M params)  " + " | ".join(cells))


if __name__ == "__main__":
    main()
