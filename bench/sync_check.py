"""Where the training step waits for the GPU: host syncs inside train(), by call site.

    python bench/sync_check.py [--steps 8] [--zero 1] [--precision bf16] [--compile off]
    DS_ACCELERATOR=cpu python bench/sync_check.py --compile off   # the same calls, found on a CPU

Runs train() (distillation, all four losses) on bench_train.py's mid-size CLIP pair with in-memory
batches. On CUDA, under `torch.cuda.set_sync_debug_mode("warn")`, which warns at every operation that
blocks the host on the device (.item(), .tolist(), non-pinned copies to the host, ...); each warning is
charged to the innermost frame outside torch (mope_dist's, DeepSpeed's), as the CPU count charges its
calls. On a CPU, under mope_dist.distill.profile.HostSyncCounter, which counts the operations that
would block on a GPU (reading values, data-dependent shapes; eager code only). A call site counted about once per step is
a sync in every step, which keeps the host from queueing the next step's work while the GPU is busy.
Counting runs from the end of the first step to the end of the last (the trainer's
`dist.note_progress(step=)` calls), so engine set-up, the first step's one-off work (torch.compile's
compilation, which under the debug mode's per-warning stack walks took longer than a minute) and the
final log, checkpoint and export are left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train import MODEL, Batches, _batches, _settings, _student_teacher  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "amp_bf16"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="distill.compile")
    opts = p.parse_args()
    if opts.steps < 2:
        p.error("--steps must be >= 2 (the first step is not counted)")

    import torch

    from mope_dist import dist
    from mope_dist.distill.profile import HostSyncCounter, call_site
    from mope_dist.distill.trainer import train

    info = dist.init_distributed(use_deepspeed=True)
    cuda = info.device.type == "cuda"
    if not cuda and opts.compile == "on":
        p.error("--compile on: the CPU count sees eager code only")
    student, teacher = _student_teacher(MODEL)
    cfg, ds, batch = _settings(opts, opts.steps, opts.batch)
    cfg = dataclasses.replace(cfg, steps=opts.steps, log_every=opts.steps)
    batches = Batches(_batches(opts.steps, opts.batch, MODEL, 0, info.device))

    sites: Counter[str] = Counter()
    counter = HostSyncCounter(info.device)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
            sites[call_site(stack)] += 1

    def count(on: bool) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode("warn" if on else "default")
        elif on:
            counter.__enter__()
        else:
            counter.__exit__(None, None, None)
            sites.update(counter.sites)

    note_progress = dist.note_progress

    def progress(**fields):  # counted: steps 2..steps
        note_progress(**fields)
        if fields.get("step") in (1, opts.steps):
            count(fields["step"] == 1)

    dist.note_progress = progress
    warnings.showwarning = record
    warnings.simplefilter("always")
    with tempfile.TemporaryDirectory() as out:
        train(
            student,
            teacher,
            batches,
            cfg,
            ds,
            micro_batch_size=batch,
            output_dir=out,
            dist_info=info,
            max_skip_rate=1.0,
        )
    counted = opts.steps - 1
    print(
        f"host syncs in train() over steps 2..{opts.steps} ({opts.precision}, ZeRO-{opts.zero}, "
        f"compile {opts.compile}, {'CUDA sync debug mode' if cuda else 'HostSyncCounter on the CPU'}), by call site:"
    )
    for site, n in sites.most_common(25):
        print(f"  {n:5d}  ({n / counted:4.1f}/step)  {site}")
    print(f"total {sum(sites.values())} ({sum(sites.values()) / counted:.1f} per step)")


if __name__ == "__main__":
    main()
