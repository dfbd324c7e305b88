"""Training metrics: the log window every rank accumulates between log steps (reduced over ranks at
each), and the rank-0 log: TensorBoard scalars, output_dir/metrics.jsonl, one compact stdout line."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from mope_dist import dist
from mope_dist.utils import atomic_write_text, get_logger

log = get_logger("mope_dist.distill")


class MetricsLog:
    """One `write(step, metrics)` per log step; every value is a float (or int) keyed by a slash name."""

    def __init__(self, output_dir: str | os.PathLike, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self._drop_after(resume_step)
        self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step or None)

    def _drop_after(self, step: int) -> None:
        """On resume, forget lines logged after the checkpoint (they will be logged again)."""
        if not self.jsonl.is_file():
            return
        kept = [line for line in self.jsonl.read_text().splitlines() if line.strip() and _step(line) <= step]
        atomic_write_text(self.jsonl, "".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict, line: str | None = None) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        with open(self.jsonl, "a") as f:  # one whole line per write: appending is safe enough for a log
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if line:
            log.info(line)

    def close(self) -> None:
        self.tb.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a crash: drop it


def format_line(step: int, total_steps: int, m: dict) -> str:
    """`step 120/1000 loss 3.21 (contrastive 2.9 kd 0.31) lr 4.8e-04 scale 14.3 | 812 samples/s (406/dev) ...`"""
    terms = " ".join(
        f"{k.split('/', 1)[1]} {v:.4g}" for k, v in m.items() if k.startswith("loss/") and k != "loss/total"
    )
    parts = [
        f"step {step}/{total_steps}",
        f"loss {m['loss/total']:.4g} ({terms})",
        f"lr {m['train/lr']:.3g}",
        f"scale {m['train/logit_scale']:.3g}",
        f"| {m['perf/samples_per_s']:.0f} samples/s ({m['perf/samples_per_s_per_device']:.0f}/dev)",
        f"step {m['perf/step_time_s'] * 1000:.0f} ms data {m['perf/data_wait_s'] * 1000:.0f} ms",
    ]
    if m.get("data/skipped_samples"):
        parts.append(f"bad samples {m['data/skipped_samples']:.0f}")
    if m.get("train/skipped_steps"):
        parts.append(f"skipped steps {m['train/skipped_steps']:.0f}")
    return " ".join(parts)


class MetricWindow:
    """What happened on this rank since the last log step: loss terms and micro-batches of the applied
    steps (device tensors, summed without a host sync), steps taken, data wait, wall time."""

    def __init__(self):
        self.skipped_logged: dict = {}  # the loader's skip counters at the last log step
        self.restart()

    def restart(self) -> None:
        self.sums: dict = {}
        self.micro = self.steps = 0
        self.data_wait = self.paused_s = 0.0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def paused(self, device: torch.device):
        """Evaluation, checkpoint and profiling time is not training throughput: left out of the
        window's wall time (the steps before and after it in the window still count). The device
        finishes the work those steps queued first, so that it is counted as theirs."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def add_step(self, step_sums: dict, micro_batches: int, skipped: bool | torch.Tensor) -> None:
        """A skipped step's (non-finite) losses are left out; `skipped` may be a flag still on the
        device (1.0: skipped), which is then applied there rather than read."""
        self.steps += 1
        if isinstance(skipped, torch.Tensor):
            step_sums = {k: torch.where(skipped > 0, 0.0, v) for k, v in step_sums.items()}
            micro_batches = (1 - skipped) * micro_batches
        elif skipped:  # keys kept: a window of skipped steps logs NaN losses
            step_sums, micro_batches = {k: torch.zeros_like(v) for k, v in step_sums.items()}, 0
        for k, v in step_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro += micro_batches

    def summary(self, global_batch: int, world: int, loader, device: torch.device) -> dict:
        """Loss terms and data wait averaged over ranks, throughput, and the loader's skip counters
        summed over ranks. Collective."""
        elapsed = time.perf_counter() - self.t0 - self.paused_s
        micro = float(self.micro)  # NaN losses when every step of the window was skipped
        local = {f"loss/{k}": v / micro if micro else float("nan") for k, v in self.sums.items()}
        local["perf/data_wait_s"] = self.data_wait / self.steps
        m = {k: v / world for k, v in reduce_sum(local, device).items()}
        skipped = loader.skipped() if hasattr(loader, "skipped") else {}
        if skipped:
            if skipped != self.skipped_logged and any(skipped.values()):
                nonzero = {k: v for k, v in skipped.items() if v}
                log.warning(f"data: skipped on this rank so far: {nonzero}")  # per rank (tagged lines)
            self.skipped_logged = skipped
            counts = reduce_sum({f"data/skipped/{k}": v for k, v in skipped.items()}, device)
            m.update(counts)
            m["data/skipped_samples"] = sum(counts.values())
        if hasattr(loader, "sample_counts"):
            c = loader.sample_counts()
            totals = reduce_sum({"used": c["used"], "skipped": c["skipped"]}, device)
            m["data/used_samples"], m["data/unusable_samples"] = totals["used"], totals["skipped"]
        samples_per_s = self.steps * global_batch / elapsed
        m["perf/samples_per_s"] = samples_per_s
        m["perf/samples_per_s_per_device"] = samples_per_s / world
        m["perf/step_time_s"] = elapsed / self.steps
        return m


def reduce_sum(values: dict, device: torch.device) -> dict[str, float]:
    """Sum over ranks of per-rank numbers or scalar tensors with identical keys (one all-reduce)."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    return dict(zip(keys, dist.all_reduce_sum(t).tolist(), strict=True))


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """{"imagenet": {"top1": 0.5}, "n": 3, "note": "x"} -> {"imagenet/top1": 0.5, "n": 3.0} (numbers only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
