"""Fault-injection helpers: tiny pre-training jobs through the real launcher, processes found by rank.

tests/faults is a package so that `tests/` is on sys.path: the shared tiny-model builders come from
tests/conftest.py (`from conftest import tiny_open_clip`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from conftest import free_port, launcher_env

from mope_dist.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def make_teacher(path: Path) -> Path:
    from conftest import tiny_open_clip

    from mope_dist.model import from_open_clip, save_pretrained

    save_pretrained(from_open_clip(tiny_open_clip(layers=2, width=64, head_width=16)), path)
    return path


def write_recipe(root: Path, name: str = "recipe.yaml", **sections) -> Path:
    """A tiny magnitude-pruning job (no proxy data: scoring is instant) over the shards in root/train."""
    recipe = {
        "teacher": {"name": str(root / "teacher")},
        "data": {"train_shards": str(root / "train"), "mode": "resampled", "batch_size": 8, "workers": 0},
        "mope": {"method": "magnitude", "neuron_groups": 4},
        "prune": {"vision": {"heads": 0.5, "mlp": 0.5}, "text": {"mlp": 0.5}},
        "distill": {"steps": 4, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2, "keep_checkpoints": 2},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "output": {"dir": str(root / "run")},
        "dist_timeout_s": 20,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = root / name
    # atomically: in test_training_faults every rank writes the same recipe, and a rank reading it while
    # another truncated it for rewriting got an empty config (teacher '') and left the others waiting
    atomic_write_text(path, yaml.safe_dump(recipe))
    return path


class Launch:
    """`bash launch/pretrain.sh RECIPE [overrides]` in its own session, output in files."""

    def __init__(self, recipe: Path, *overrides: str, nproc: int = 2, log: Path | None = None):
        self.log = log or recipe.with_suffix(f".{time.monotonic_ns()}.log")
        env = launcher_env(NPROC_PER_NODE=nproc, MASTER_PORT=free_port())
        cmd = ["bash", "launch/pretrain.sh", str(recipe), *overrides]
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._out.close()

    def kill(self) -> None:
        """SIGKILL everything this launch started (its own session), after resuming stopped processes."""
        for pid in session_pids(self.proc.pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.proc.wait()

    def rank_pid(self, rank: int, timeout: float = 120) -> int:
        """The pid of the training process of `rank` (not its DataLoader workers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in session_pids(self.proc.pid) if _env(p).get("RANK") == str(rank)]
            top = [p for p in pids if _ppid(p) not in pids]
            if top:
                return top[0]
            time.sleep(0.2)
        raise TimeoutError(f"no process of rank {rank} appeared")


def session_pids(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    out.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants, found through their parent pids: torchrun starts its
    workers in sessions of their own, so killing its process group would leave them running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(_ppid(int(entry.name)), []).append(int(entry.name))
    doomed, todo = [], [pid]
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo.extend(children.get(p, []))
    for p in doomed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def flip_byte(path: Path) -> None:
    """Damage a file in place without changing its size: invert the bits of its middle byte."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, 50)).save(buf, format="JPEG")
    return buf.getvalue()


def write_samples(path: Path, n: int, start: int = 0, no_caption=(), bad_image=()) -> Path:
    """A tar shard of `n` samples captioned "sample <id>"; some without caption or with a broken jpg."""
    from mope_dist.data.synthetic import write_tar

    records = []
    for i in range(n):
        parts = {"jpg": b"\xff\xd8 not really a jpeg" if i in bad_image else jpeg(start + i)}
        if i not in no_caption:
            parts["txt"] = f"sample {start + i}".encode()
        records.append((f"{start + i:06d}", parts))
    write_tar(path, records)
    return path
