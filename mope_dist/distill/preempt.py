"""SIGTERM during training: every rank agrees, saves a complete checkpoint, and exits with one line.

Schedulers (SLURM, Kubernetes) preempt with SIGTERM and kill a grace period later. While a
`Preemption` is armed (the training loop, see mope_dist.distill.trainer):

- the first SIGTERM only sets a flag (and prints one line); the loop calls `stop_requested()` at every
  step boundary on every rank: the ranks' flags are summed by an all-reduce on a separate gloo group,
  started at one boundary and read at the next, so it overlaps a training step and never waits on the
  GPU (the last one is waited for when training ends: `settle()`). All ranks see the same sum, so they
  stop at the same step, one step after the signal;
- the loop then saves a checkpoint (CheckpointManager.save: the completion marker is written last) and
  raises `stopped(...)`, a `Preempted` error: `preempted: checkpoint ... saved Ns after SIGTERM; rerun
  the same command to continue from it`, exit status 143;
- `grace_s` after the first SIGTERM, or on a second SIGTERM, the process exits at once (143) with a line
  saying whether the checkpoint was complete. A save cut short has no completion marker and is never
  resumed from, so there is never a torn checkpoint. SIGTERMs within `REPEAT_WINDOW_S` of the first are
  the same request: a launcher that forwards the signal it also received (the deepspeed launcher sends
  SIGTERM to every process of each rank, which SLURM has signalled already) is not a second one;
- DataLoader workers started while armed ignore SIGTERM (torch's own worker handler would die on one not
  sent by the parent, and the rank would fail before saving); they end with their loader or, if the
  rank is killed, by torch's parent watchdog.

`grace_s=0` disarms it: SIGTERM exits at once, as outside training (mope_dist.dist). The deepspeed
launcher kills a rank 30 s after forwarding a SIGTERM to it, whatever `grace_s` says.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time

import torch
import torch.distributed as tdist

from mope_dist import dist
from mope_dist.errors import Preempted
from mope_dist.utils import get_logger

log = get_logger("mope_dist.distill")

REPEAT_WINDOW_S = 5.0


@functools.cache
def _flag_group():
    """The gloo group the SIGTERM flags are summed on: made once per process (collectively, by the
    first training), so that trainings run one after another do not pile up process groups."""
    return tdist.new_group(backend="gloo")


class Preemption:
    """Armed from construction (collective: every rank, at the same point) until `close()`."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested_at: float | None = None  # time.monotonic() of this rank's first SIGTERM
        self.saved: str | None = None  # the checkpoint saved for the request
        self._pending = None  # (work, flag tensor) of the all-reduce started at the last step boundary
        self._group = None
        self._pid = os.getpid()
        self._previous_handler = None
        self._worker_setup = None
        if grace_s <= 0:
            return
        if dist.get_world_size() > 1:
            self._group = _flag_group()
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: SIGTERM keeps exiting at once
            log.warning("preemption handling needs the main thread; SIGTERM will exit without a checkpoint")
            return
        self._patch_worker_signals()

    @property
    def armed(self) -> bool:
        return self._previous_handler is not None

    def stop_requested(self) -> bool:
        """Collective, at every step boundary on every rank: True on all ranks at the same step once any
        rank received SIGTERM (one step after it)."""
        if not self.armed:
            return False
        if self._group is None:
            return self.requested_at is not None
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        if agreed:
            self._pending = None
        else:
            flag = torch.tensor([int(self.requested_at is not None)], dtype=torch.int32)
            self._pending = (tdist.all_reduce(flag, group=self._group, async_op=True), flag)
        return agreed

    def settle(self) -> None:
        """Collective, once training ended normally on every rank: wait for the flag all-reduce started at
        the last step boundary. Left pending, gloo's thread may free it while the interpreter finalises,
        and freeing it there takes the GIL from a dying interpreter: SIGABRT ("terminate called without an
        active exception") after the results are written, on ranks that finished far apart."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def stopped(self, checkpoint) -> Preempted:
        """The error to raise once `checkpoint` (a complete one) is saved for the request."""
        self.saved = str(checkpoint)
        dist.note_progress(checkpoint=self.saved)
        took = f" {time.monotonic() - self.requested_at:.1f}s after SIGTERM" if self.requested_at else ""
        return Preempted(
            f"checkpoint {checkpoint} saved{took} (distill.preempt_grace_s={self.grace_s:g}); rerun the "
            "same command to continue from it"
        )

    def close(self) -> None:
        """Disarm: SIGTERM exits at once again. A grace timer already running keeps running."""
        if not self.armed:
            return
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None
        self._pending = None  # after an error a peer may never start it: not waited for (CLIs os._exit)
        from torch.utils.data._utils import signal_handling

        signal_handling._set_worker_signal_handlers = self._worker_setup

    def _on_sigterm(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child that is not a DataLoader worker: its rank decides
            return
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            timer = threading.Timer(
                self.grace_s, self._exit, args=(f"grace period of {self.grace_s:g}s expired",)
            )
            timer.daemon = True
            timer.start()
            log.warning(
                "received SIGTERM: saving a checkpoint at the next step boundary, then exiting "
                f"(distill.preempt_grace_s={self.grace_s:g})"
            )
        elif now - self.requested_at >= REPEAT_WINDOW_S:
            self._exit("second SIGTERM")

    def _exit(self, reason: str) -> None:
        if self.saved:
            dist.exit_with_line(f"preempted: checkpoint {self.saved} was saved; {reason}: exiting")
        dist.exit_with_line(
            f"preempted: {reason} before the checkpoint was complete: exiting without it (a save cut short "
            "has no completion marker and is never resumed from); rerun the same command to continue "
            "from the latest complete checkpoint"
        )

    def _patch_worker_signals(self) -> None:
        """DataLoader workers forked from now on ignore SIGTERM (see the module docstring)."""
        from torch.utils.data._utils import signal_handling

        self._worker_setup = original = signal_handling._set_worker_signal_handlers

        def setup(*args):
            original(*args)
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)

        signal_handling._set_worker_signal_handlers = setup
