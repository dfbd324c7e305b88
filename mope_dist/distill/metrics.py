"""Rank-0 training log: TensorBoard scalars, output_dir/metrics.jsonl, and one compact stdout line."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
