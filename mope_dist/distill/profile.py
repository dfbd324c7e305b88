"""A torch.profiler window over a few training steps (distill.profile_steps): where a step's time goes,
on the device and on the host, without profiling the rest of the run.

The window opens after `start` steps (past torch.compile and the first allocations) and closes once
`count` more steps are done, before that step's logging, evaluation or checkpoint; the device is
synchronised at both ends so that the wall time holds the work queued in it. It then writes, per rank:
`ops_rank{r}.txt` (top operators by device time, then by host time, where the host's synchronisations
show), `summary_rank{r}.json` (per step: wall ms, ms the device was busy with kernels, copies or
memsets, host ms in operators and runtime calls other than synchronisations), and, on rank 0,
`trace_rank0.json.gz` for Perfetto or chrome://tracing.
"""

from __future__ import annotations

import gzip
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mope_dist.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, get_logger

log = get_logger("mope_dist.distill")

# operators that make the host wait for the device: reading a value (.item(), bool(t), float(t)) and
# those whose output size depends on the data
SYNCING_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "equal",
    }
)
# Tensor methods that copy to the host (on a CPU no-ops that never reach the dispatcher)
HOST_COPIES = ("tolist", "numpy", "cpu")
_CHECKOUT = str(Path(__file__).resolve().parents[2]) + "/"
_DISPATCH = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py")  # between op and mode


class HostSyncCounter(TorchDispatchMode):
    """Counts, by call site, the calls that would make the host wait for a GPU.

    On a CPU nothing waits, but a CPU run of the same eager code makes the same calls, so this finds a
    GPU step's host syncs without a GPU (torch.cuda.set_sync_debug_mode needs one): value reads, boolean
    masks and other data-dependent shapes, `.tolist()`, `.numpy()`, `.cpu()`. Compiled graphs are not
    seen: count with torch.compile off. Reading a value held on the host by design is not counted:
    tensors on the CPU when `device` is a GPU, and the step counts non-fused torch optimizers keep there.
    A site is the innermost frame outside torch: mope_dist's, DeepSpeed's or the caller's own line.
    """

    def __init__(self, device: torch.device | None = None):
        super().__init__()
        self.stand_in = device is None or device.type == "cpu"  # every tensor stands in for one on a GPU
        self.sites: Counter[str] = Counter()
        self._methods: dict = {}

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (self.stand_in or t.device.type != "cpu")

    def _record(self) -> None:
        inner = 2  # this method and the __torch_dispatch__ / method wrapper that called it
        stack = [f for f in traceback.extract_stack()[:-inner] if not any(m in f.filename for m in _DISPATCH)]
        if not (stack[-1].name == "_get_value" and "torch/optim/" in stack[-1].filename):
            self.sites[call_site(stack)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        masked = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if (name in SYNCING_OPS or masked) and self._on_device(args[0]):
            self._record()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_COPIES:
            method = self._methods[name] = getattr(torch.Tensor, name)

            def counted(t, *args, _method=method, **kwargs):
                if self._on_device(t):
                    self._record()
                return _method(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def call_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch (torch code is charged to its caller), as "file:line function"
    with the file relative to site-packages or to this checkout."""
    frame = next((f for f in reversed(stack) if "/torch/" not in f.filename), stack[-1])
    path = frame.filename.rpartition("/site-packages/")[2]
    if path.startswith(_CHECKOUT):
        path = path[len(_CHECKOUT) :]
    return f"{path}:{frame.lineno} {frame.name}"


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: kernels and copies on several streams overlap."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


class StepProfiler:
    """Profiles steps start+1 .. start+count. The training loop asks `opens_at(steps_done)` before a
    step (then `open()`) and `closes_at(steps_done)` after a step is done (then `close_window()`)."""

    def __init__(self, start: int, count: int, device: torch.device, out_dir: Path | None, rank: int = 0):
        self.start, self.count, self.device = start, count, device
        self.out_dir, self.rank = out_dir, rank
        self.prof, self.t0 = None, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def opens_at(self, steps_done: int) -> bool:
        return bool(self.count) and self.prof is None and steps_done == self.start

    def open(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        cuda = [ProfilerActivity.CUDA] if self.device.type == "cuda" else []
        self.prof = profile(activities=[ProfilerActivity.CPU, *cuda])
        self._sync()
        self.prof.start()
        self.t0 = time.perf_counter()

    def closes_at(self, steps_done: int) -> bool:
        return self.prof is not None and steps_done == self.start + self.count

    def close_window(self) -> dict:
        """Stop profiling; -> the per-step summary (also written with the tables and the trace)."""
        self._sync()
        wall_s = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        prof.stop()
        return self._summary(prof, wall_s)

    def close(self) -> None:
        """At the end of training: stop a window cut short (last step, preemption, an error), writing
        nothing and never raising over the error that may be on its way."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            try:
                prof.stop()
            except Exception as exc:  # e.g. a CUDA error that also ended training
                log.warning(f"profiler could not be stopped: {exc}")

    def _summary(self, prof, wall_s: float) -> dict:
        from torch.autograd import DeviceType

        events = prof.events()
        device = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        device_us = busy_us([(e.time_range.start, e.time_range.end) for e in device])
        host = [e for e in events if e.device_type == DeviceType.CPU and "Synchronize" not in e.name]
        n = self.count
        summary = {
            "steps": n,
            "wall_ms": 1e3 * wall_s / n,
            "device_busy_ms": device_us / 1e3 / n,
            "host_ops_ms": sum(e.self_cpu_time_total for e in host) / 1e3 / n,
        }
        if self.out_dir is not None:
            averages = prof.key_averages()
            orders = ["self_device_time_total"] if device_us else []
            tables = [
                f"by {o}:\n{averages.table(sort_by=o, row_limit=40)}"
                for o in [*orders, "self_cpu_time_total"]
            ]
            atomic_write_text(self.out_dir / f"ops_rank{self.rank}.txt", "\n".join(tables))
            atomic_write_json(self.out_dir / f"summary_rank{self.rank}.json", summary)
            if self.rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
                    data = gzip.compress((Path(tmp) / "trace.json").read_bytes(), compresslevel=1)
                atomic_write_bytes(self.out_dir / "trace_rank0.json.gz", data)
        return summary
