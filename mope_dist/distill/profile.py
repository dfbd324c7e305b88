"""A torch.profiler window over a few training steps (distill.profile_steps): where a step's time goes,
on the device and on the host, without profiling the rest of the run.

The window opens after `start` steps (past torch.compile and the first allocations) and closes
`count` steps later, the device synchronised at both ends so that its wall time holds the work queued
in it. It then writes, per rank: `ops_rank{r}.txt` (top operators by device time, or host time on a
CPU), `summary_rank{r}.json` (per step: wall ms, ms the device was busy with kernels or copies, host
ms in operators), and, on rank 0, `trace_rank0.json.gz` for Perfetto or chrome://tracing.
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path

import torch

from mope_dist.utils import atomic_write_bytes, atomic_write_json, atomic_write_text


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: kernels and copies on several streams overlap."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


class StepProfiler:
    """Profiles steps start+1 .. start+count. Call `before_step(steps_done)` at the top of every step;
    it returns the window's summary at the step that closes it, else None."""

    def __init__(self, start: int, count: int, device: torch.device, out_dir: Path | None, rank: int = 0):
        self.start, self.count, self.device = start, count, device
        self.out_dir, self.rank = out_dir, rank
        self.prof, self.t0 = None, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, steps_done: int) -> dict | None:
        if not self.count:
            return None
        if steps_done == self.start and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
            self.prof = profile(activities=[ProfilerActivity.CPU, *cuda])
            self._sync()
            self.prof.start()
            self.t0 = time.perf_counter()
        elif steps_done == self.start + self.count and self.prof is not None:
            self._sync()
            wall_s = time.perf_counter() - self.t0
            self.prof.stop()
            summary = self._summary(wall_s)
            self.prof = None
            return summary
        return None

    def close(self) -> None:
        """Stop a window that training ended inside (last step, preemption): nothing is written."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _summary(self, wall_s: float) -> dict:
        from torch.autograd import DeviceType

        events = self.prof.events()
        device_us = busy_us(
            [(e.time_range.start, e.time_range.end) for e in events if e.device_type != DeviceType.CPU]
        )
        averages = self.prof.key_averages()
        host_us = sum(e.self_cpu_time_total for e in averages)
        n = self.count
        summary = {
            "steps": n,
            "wall_ms": 1e3 * wall_s / n,
            "device_busy_ms": device_us / 1e3 / n,
            "host_ops_ms": host_us / 1e3 / n,
        }
        if self.out_dir is not None:
            sort_by = "self_device_time_total" if device_us else "self_cpu_time_total"
            atomic_write_text(
                self.out_dir / f"ops_rank{self.rank}.txt", averages.table(sort_by=sort_by, row_limit=40)
            )
            atomic_write_json(self.out_dir / f"summary_rank{self.rank}.json", summary)
            if self.rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    self.prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
                    data = gzip.compress((Path(tmp) / "trace.json").read_bytes())
                atomic_write_bytes(self.out_dir / "trace_rank0.json.gz", data)
        return summary
