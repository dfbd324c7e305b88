"""Job-level throughput: the real `launch/pretrain.sh` on shards of realistic JPEGs vs the in-memory trainer.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_job.py           # small CLIP at 64 px, CPU
    python bench/bench_job.py --model ViT-B-16 --batch 256 --workers 12 --steps 100    # one GPU

1. Writes shards of JPEGs 400-500 px a side (textured, ~40-60 KB: what real photos cost to decode),
   resized by the model's train transform to its image size.
2. Loader alone: samples/s of the job's loader with open_clip's float transform and with the uint8 one
   (mope_dist.data.device.split_normalize), per worker process.
3. The job: `bash launch/pretrain.sh` (the module it runs is read from the script) with the teacher
   (random weights) scored by magnitude (instant: scoring is not what this measures), pruned to half
   its layers, heads and MLP in both towers, then distilled. From the run's metrics.jsonl, the windows
   after `--warmup` steps give steady-state samples/s and the share of step time spent waiting for
   data (perf/data_wait_s / perf/step_time_s); on a GPU also how busy NVML saw it in those windows.
4. In-memory trainer: train() on the job's pruned student and its teacher with the job's own training
   settings, on random batches already on the device (bench_train.py's path): the job's ceiling.

Prints samples/s, MFU (mope_dist.model.train_flops_per_sample over `--peak-tflops`, default by GPU
name, see bench_train.PEAK_TFLOPS) and the ratio job / in-memory (goal >= 0.9); writes the figures
to OUT/bench_job.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The CPU default teacher: bench_train's mid-size CLIP (64 px, 6 layers of width 256 in both towers).
from bench_train import MODEL, Batches, _batches, _trainer_samples_per_s, format_mfu, peak_tflops  # noqa: E402


def launcher_module(script: Path = ROOT / "launch" / "pretrain.sh") -> str:
    """The Python module launch/pretrain.sh runs (`--module NAME` in its last line)."""
    match = re.search(r"--module\s+([\w.]+)", script.read_text())
    if not match:
        sys.exit(f"bench_job: no `--module NAME` in {script}")
    return match.group(1)


def realistic_jpeg(index: int, seed: int) -> bytes:
    """A 400-500 px JPEG (quality 90) with photo-like entropy: smooth colour fields, texture and grain."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    w, h = (int(x) for x in rng.integers(400, 501, size=2))
    base = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    mid = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(mid).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    pixels = 0.7 * smooth + 0.3 * texture + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_shard(job: tuple[Path, int, int, int]) -> int:
    from mope_dist.data.synthetic import (
        BACKGROUNDS,
        COLOURS,
        POSITIONS,
        SHAPES,
        SIZES,
        caption,
        write_tar,
    )

    out, shard, per_shard, seed = job
    records, nbytes = [], 0
    for i in range(shard * per_shard, (shard + 1) * per_shard):
        rng = random.Random(f"{seed}:{i}")
        attrs = {
            k: rng.choice(list(v))
            for k, v in dict(
                colour=COLOURS, shape=SHAPES, size=SIZES, position=POSITIONS, background=BACKGROUNDS
            ).items()
        }
        image = realistic_jpeg(i, seed)
        nbytes += len(image)
        records.append((f"{i:09d}", {"jpg": image, "txt": caption(attrs, rng).encode()}))
    write_tar(out / f"{shard:06d}.tar", records)
    return nbytes


def write_shards(out: Path, samples: int, shards: int, seed: int = 0) -> tuple[str, float]:
    """-> (shard spec, mean JPEG bytes); shards are written in parallel, one process per core."""
    from mope_dist.utils import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, samples // shards)
    with mp.get_context("spawn").Pool(min(shards, os.cpu_count() or 1)) as pool:
        sizes = pool.map(_write_shard, [(out, s, per_shard, seed) for s in range(shards)])
    atomic_write_json(out / "sizes.json", {f"{s:06d}.tar": per_shard for s in range(shards)})
    return str(out / f"{{000000..{shards - 1:06d}}}.tar"), sum(sizes) / (per_shard * shards)


def loader_rates(spec: str, pruned: Path, batch: int, workers: int, batches: int) -> dict[str, float]:
    """Samples/s of the job's loader alone, float32 (open_clip's transform) and uint8 (split) outputs,
    over `batches` batches after each worker's first one (start-up; workers build whole batches)."""
    from mope_dist.data import make_image_text_loader
    from mope_dist.data.device import split_normalize
    from mope_dist.model.io import get_tokenizer, read_config, transforms
    from mope_dist.model.spec import CLIPSpec

    preprocess = transforms(CLIPSpec.from_dict(read_config(pruned)["spec"]))[0]
    tokenizer = get_tokenizer(pruned)
    rates = {}
    for name, transform in (("float32", preprocess), ("uint8", split_normalize(preprocess)[0])):
        loader = make_image_text_loader(
            spec, transform, tokenizer, batch, num_workers=workers, mode="resampled",
            samples_per_epoch=batch * (batches + max(1, workers)), rank=0, world_size=1,
        )  # fmt: skip
        it = iter(loader)
        for _ in range(max(1, workers)):
            next(it)
        t0 = time.perf_counter()
        n = sum(len(images) for images, _ in it)
        rates[name] = n / (time.perf_counter() - t0)
    return rates


def job_config(opts, out: Path, shards: str, teacher: str) -> Path:
    """The job's recipe: everything but the run-specific paths, which go on the command line."""
    import yaml

    half = {"layers": 0.5, "heads": 0.5, "mlp": 0.5}
    steps = opts.warmup + opts.steps
    cfg = {
        "teacher": {"name": teacher},
        "data": {
            "mode": "resampled",
            "samples_per_epoch": opts.batch * steps,
            "batch_size": opts.batch,
            "workers": opts.workers,
        },
        "mope": {"method": "magnitude"},
        "prune": {"vision": half, "text": half},
        "distill": {"steps": steps, "warmup_steps": 2, "log_every": opts.log_every, "ckpt_every": steps},
        "deepspeed": {"zero_stage": opts.zero, "precision": opts.precision},
        "output": {"overwrite": True},
        "dist_timeout_s": 600,
    }
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class GpuBusy:
    """NVML's GPU utilisation (share of time a kernel ran), sampled twice a second while the job runs,
    each sample tagged with the number of log windows metrics.jsonl held at the time."""

    def __init__(self, metrics: Path):
        import torch

        self.metrics, self.samples, self.stop = metrics, [], threading.Event()
        self.utilization = torch.cuda.utilization
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _windows(self) -> int:
        text = self.metrics.read_text() if self.metrics.exists() else ""
        return text.count("perf/samples_per_s")

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.samples.append((self._windows(), self.utilization()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def mean(self, first: int, last: int) -> float | None:
        """Mean utilisation (%) while windows first..last-1 (0-based) were being run."""
        busy = [u for n, u in self.samples if first <= n < last]
        return sum(busy) / len(busy) if busy else None


def run_job(opts, config: Path, shards: str, run_dir: Path, gpu: bool) -> tuple[list[dict], float | None]:
    """bash launch/pretrain.sh CONFIG overrides; -> (the metrics.jsonl lines, GPU busy % in the steady
    windows, or None on CPU)."""
    env = {
        **os.environ,
        "PYTHON": os.environ.get("PYTHON", sys.executable),
        "NPROC_PER_NODE": str(opts.nproc),
        "MASTER_PORT": str(opts.master_port),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = ["bash", str(ROOT / "launch" / "pretrain.sh"), str(config)]
    cmd += [f"data.train_shards={shards}", f"output.dir={run_dir}", *opts.set]
    log = run_dir.parent / "job.log"
    busy = GpuBusy(run_dir / "metrics.jsonl") if gpu else contextlib.nullcontext()
    with open(log, "w") as f, busy:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(
            f"bench_job: the job failed (exit {proc.returncode}); end of {log}:\n" + log.read_text()[-4000:]
        )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    windows = (opts.warmup + opts.steps) // opts.log_every
    return lines, busy.mean(opts.warmup // opts.log_every, windows) if gpu else None


def steady_state(lines: list[dict], warmup: int) -> dict:
    """Median samples/s and data-wait share over the log windows that end after `warmup` steps."""
    windows = [x for x in lines if "perf/samples_per_s" in x and x["step"] > warmup]
    if not windows:
        sys.exit(f"bench_job: no log window after the {warmup} warm-up steps; raise --steps")
    return {
        "samples_per_s": statistics.median(x["perf/samples_per_s"] for x in windows),
        "step_time_s": statistics.median(x["perf/step_time_s"] for x in windows),
        "data_wait_s": statistics.median(x["perf/data_wait_s"] for x in windows),
        "data_wait_share": statistics.median(x["perf/data_wait_s"] / x["perf/step_time_s"] for x in windows),
        "windows": len(windows),
    }


def worker(opts) -> None:
    """(under torchrun) train() on in-memory device batches with the job's model pair and settings."""
    import torch

    from mope_dist.config import load_config
    from mope_dist.dist import init_distributed
    from mope_dist.model import load_model, load_teacher, train_flops_per_sample
    from mope_dist.recipes.builders import micro_batch_size

    info = init_distributed(use_deepspeed=True)
    run = Path(opts.run_dir)
    cfg = load_config(run / "config.yaml")
    teacher = load_teacher(cfg.teacher.name, cfg.teacher.pretrained)[0]
    student = load_model(run / "pruned").train()
    flops = train_flops_per_sample(student, teacher)
    distill = replace(cfg.distill, steps=2 * opts.steps, log_every=opts.steps, ckpt_every=2 * opts.steps)
    settings = (distill, cfg.deepspeed, micro_batch_size(cfg, info.world_size))
    shape = {
        "vision_cfg": {"image_size": student.spec.vision.image_size[0]},
        "text_cfg": {"context_length": student.spec.text.context_length},
    }
    batches = _batches(min(opts.steps, 16), settings[2], shape, info.rank, info.device)
    rate = _trainer_samples_per_s(
        run.parent / "in_memory", student, teacher, Batches(batches), settings, info
    )
    name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    if info.is_main:
        result = {"samples_per_s": rate, "flops_per_sample": flops, "device": name}
        Path(opts.result).write_text(json.dumps(result))


def in_memory(opts, run_dir: Path) -> dict:
    result = run_dir.parent / "in_memory.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(opts.nproc)]
    cmd += [__file__, "--worker", f"--run-dir={run_dir}", f"--result={result}", f"--steps={opts.steps}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench_job: in-memory trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="teacher: open_clip name (random weights); default small")
    p.add_argument("--batch", type=int, default=32, help="global batch (data.batch_size)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) of the job")
    p.add_argument("--workers", type=int, default=2, help="loader workers per process")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    p.add_argument("--log-every", type=int, default=5, help="log window (steps)")
    p.add_argument("--samples", type=int, default=512, help="distinct JPEGs written (the job cycles them)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument(
        "--loader-batches", type=int, default=None, help="timed loader-alone batches (3 x workers)"
    )
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "amp_bf16"], default=None, help="default: bf16 on GPU"
    )
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--master-port", type=int, default=29517)
    p.add_argument("--set", action="append", default=[], help="extra config override (key=value), repeatable")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        return worker(opts)
    if opts.steps < opts.log_every:
        sys.exit("bench_job: --steps must cover at least one log window (--log-every)")

    import torch

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    opts.precision = opts.precision or ("bf16" if cuda else "fp32")
    out = Path(opts.out or tempfile.mkdtemp(prefix="bench_job_"))
    out.mkdir(parents=True, exist_ok=True)
    module = launcher_module()
    teacher = opts.model
    if teacher is None:
        (out / "teacher").mkdir(exist_ok=True)
        (out / "teacher" / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL}))
        teacher = f"local-dir:{out / 'teacher'}"

    t0 = time.perf_counter()
    shards, jpeg_bytes = write_shards(out / "shards", opts.samples, opts.shards)
    print(
        f"bench_job: launch/pretrain.sh -> {module}; teacher {opts.model or 'small CLIP (64 px)'} -> half layers, "
        f"heads, MLP; batch {opts.batch} on {opts.nproc} process(es), {opts.workers} workers each, "
        f"{opts.precision} ZeRO-{opts.zero}; out {out}\n"
        f"data: {opts.samples} JPEGs of 400-500 px (mean {jpeg_bytes / 1024:.0f} KB) in {opts.shards} shards, "
        f"written in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    run_dir = out / "run"
    lines, gpu_busy = run_job(opts, job_config(opts, out, shards, teacher), shards, run_dir, cuda)
    job = steady_state(lines, opts.warmup)
    job["gpu_busy_percent"] = gpu_busy
    ref = in_memory(opts, run_dir)
    per_rank = opts.batch // opts.nproc
    timed = opts.loader_batches or 3 * max(1, opts.workers)
    loader = loader_rates(shards, run_dir / "pruned", per_rank, opts.workers, timed)

    peak = peak_tflops(ref["device"], opts.peak_tflops)
    flops = ref["flops_per_sample"]
    ratio = job["samples_per_s"] / ref["samples_per_s"]
    print(
        f"loader alone ({opts.workers} workers, batch {per_rank}): "
        + ", ".join(f"{k} {v:.0f} samples/s ({v / opts.workers:.0f}/worker)" for k, v in loader.items())
    )
    print(
        f"job ({job['windows']} windows after step {opts.warmup}): {job['samples_per_s']:.1f} samples/s, "
        f"MFU {format_mfu(job['samples_per_s'], flops, peak)}, data wait {job['data_wait_share']:.1%} of the "
        f"step ({job['data_wait_s'] * 1e3:.1f} of {job['step_time_s'] * 1e3:.1f} ms)"
        + (f", GPU busy {gpu_busy:.0f}% (NVML)" if gpu_busy is not None else "")
    )
    print(
        f"in-memory trainer: {ref['samples_per_s']:.1f} samples/s, MFU {format_mfu(ref['samples_per_s'], flops, peak)}"
        f" ({ref['device']}, peak {peak or '?'} TFLOP/s, {flops / 1e9:.2f} GFLOP/sample)"
    )
    print(f"ratio job / in-memory trainer: {ratio:.3f} (goal >= 0.9)")
    figures = {"job": job, "in_memory": ref, "loader": loader, "ratio": ratio, "peak_tflops": peak}
    (out / "bench_job.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
