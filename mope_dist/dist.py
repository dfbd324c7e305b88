"""Process-group setup, the few collectives the library needs, and how a failed process ends.

Works under the `deepspeed` launcher, torchrun, or as a plain single process (no launcher env: no
process group at all, every collective is a no-op). gloo on CPU, nccl on GPU.

Failure behaviour (installed by `init_distributed`):
- Every collective, including those on the groups DeepSpeed creates itself (its data-parallel clone of
  the world group, ZeRO groups), times out after `timeout_s`: torch gives groups created without an
  explicit timeout its own default (30 min for gloo), so that default is set to `timeout_s` too.
- An uncaught exception ends the process with one clear last line: `config error: ...` (exit 2) for
  a ConfigError, `error: ...` (exit 1) for a JobError (a failure the user can act on: full disk, too
  many bad samples or non-finite steps), and for a failed collective (a peer died, was killed, or its
  node is unreachable) a line saying so and that rerunning the same command resumes (exit 1).
- SIGTERM (the deepspeed launcher stops every rank this way when one fails; schedulers preempt with it)
  prints one line before exiting with status 143.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.distributed.distributed_c10d as c10d

from mope_dist.errors import ConfigError, JobError, Preempted


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float = 300.0, use_deepspeed: bool = False) -> DistInfo:
    """Join the process group described by the launcher's env vars (idempotent).

    `timeout_s` bounds every collective, so a dead peer turns into an error instead of a hang.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    install_failure_handlers()
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if _launched() and int(os.environ["WORLD_SIZE"]) >= 1 and not tdist.is_initialized():
        if int(os.environ["WORLD_SIZE"]) > 1:  # the launcher names a dead process by its pid only
            rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
            print(f"rank {rank} of {world}: pid {os.getpid()} on {socket.gethostname()}", file=sys.stderr)
        global _timeout_s
        _timeout_s = timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        # groups created later without a timeout (DeepSpeed's world clone, ZeRO groups) get torch's
        # default, not the world group's: make that default ours as well
        c10d.default_pg_timeout = timeout
        c10d.default_pg_nccl_timeout = timeout
        backend = "nccl" if use_cuda else "gloo"
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            tdist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(get_rank(), get_world_size(), local_rank, device)


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (identity in a single process)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def _multi() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


def broadcast_object(obj, src: int = 0, group=None):
    """Send a small object we built ourselves (config, plan) from `src` to every rank."""
    if not _multi():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's small object (e.g. checksums of the files it wrote), in rank order, on every rank."""
    if not _multi():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


_long_wait_groups: dict = {}


def long_wait_group(timeout_s: float):
    """A gloo group over all ranks whose collectives wait up to `timeout_s`, for waiting on work that one
    rank does alone and that may outlast dist_timeout_s (converting a checkpoint). Collective on first use
    (every rank must ask for it at the same point); None in a single process."""
    if not _multi():
        return None
    if timeout_s not in _long_wait_groups:
        timeout = datetime.timedelta(seconds=timeout_s)
        _long_wait_groups[timeout_s] = tdist.new_group(backend="gloo", timeout=timeout)
    return _long_wait_groups[timeout_s]


# ---------------------------------------------------------------------------------------------
# How a process ends when something fails


_COLLECTIVE_MARKERS = ("gloo", "nccl", "c10d", "ProcessGroup", "Connection closed by peer", "Socket Timeout")
_timeout_s: float | None = None


def is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or a backend error raised as a plain RuntimeError (gloo does that)."""
    if isinstance(exc, tdist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _COLLECTIVE_MARKERS)


def _rank_tag() -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def _message(exc: BaseException) -> str:
    """The exception's message; for one re-raised from a DataLoader worker (whose message is the
    worker's whole traceback), the original message."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        _, sep, original = text.splitlines()[-1].partition(": ")
        return original if sep else text.splitlines()[-1]
    return text


def _first_line(exc: BaseException) -> str:
    text = _message(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def failure_line(exc: BaseException) -> tuple[str, int]:
    """The one line that ends a failed process, and its exit status."""

    chained = exc.__cause__ or exc.__context__
    if isinstance(exc, ConfigError):
        return f"config error: {exc}", 2
    if isinstance(exc, Preempted):
        return f"preempted: {exc}", 128 + signal.SIGTERM
    if isinstance(exc, JobError):
        return f"error: {_message(exc)}", 1
    if is_collective_failure(exc) or (chained is not None and is_collective_failure(chained)):
        cause = exc if is_collective_failure(exc) else chained
        limit = f" within dist_timeout_s={_timeout_s:g}s" if _timeout_s else ""
        return (
            "error: a collective operation failed: another process died, was killed, became unreachable "
            f"(node lost) or did not reach the same point{limit} ({type(cause).__name__}: "
            f"{_first_line(cause)}). Rerun the same command to resume from the latest complete checkpoint.",
            1,
        )
    return f"error: {type(exc).__name__}: {_first_line(exc)}", 1


def _where() -> str:
    if not _progress:
        return ""
    return " [" + ", ".join(f"{k} {v}" for k, v in _progress.items()) + "]"


def _excepthook(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    line, status = failure_line(exc)

    # the real stderr: torch.distributed wraps this hook and collects its output in a buffer it would
    # only print after we return
    err = sys.__stderr__
    if not isinstance(exc, (ConfigError, JobError)):
        traceback.print_exception(exc_type, exc, tb, file=err)  # unexpected: traceback, then summary
    if not isinstance(exc, ConfigError):
        line += _where()
    print(f"{_rank_tag()}{line}", file=err, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    # exit now, with the status the line promises: a process group with a dead peer can block or
    # abort in its destructor (DataLoader workers notice their parent is gone and exit)
    os._exit(status)


def exit_with_line(line: str, status: int = 128 + signal.SIGTERM) -> None:
    """End the process now with `line` (rank-tagged, with the progress note) as its last line."""
    print(f"{_rank_tag()}{line}{_where()}", file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    os._exit(status)


def _on_sigterm(signum, frame) -> None:
    if os.getpid() != _handler_pid:  # a forked child (not a DataLoader worker: torch handles theirs)
        os._exit(128 + signal.SIGTERM)
    exit_with_line(
        "received SIGTERM (the launcher stops every rank when one fails; a scheduler preempts this way): "
        "exiting; rerun the same command to resume from the latest complete checkpoint"
    )


def install_failure_handlers() -> None:
    """The excepthook and SIGTERM handler described in the module docstring (idempotent)."""
    global _handler_pid
    sys.excepthook = _excepthook
    _handler_pid = os.getpid()
    if "RANK" in os.environ and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None, _on_sigterm):
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            pass


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_error(error: str | None) -> tuple[str, list[int]] | None:
    """Collective: (the error of the lowest failing rank, every failing rank), or None when no rank failed.

    Lets all ranks stop together, with the same message, after a step that can fail on some of them."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return None if error is None else (error, [0])
    flags = torch.zeros(tdist.get_world_size(), dtype=torch.int32, device=_collective_device())
    flags[tdist.get_rank()] = int(error is not None)
    failed = all_reduce_sum(flags).nonzero().flatten().tolist()
    if not failed:
        return None
    return broadcast_object(error, src=failed[0]), failed


_progress: dict = {}
_handler_pid = -1


def note_progress(**fields) -> None:
    """Record where the job is (step, latest checkpoint): failure lines end with it."""
    _progress.update(fields)
