"""Checkpoints: an interrupted or damaged save (truncated, or a flipped byte: the marker holds CRC-32s)
is never resumed from; a failed save (full disk, unwritable directory) is one clear error that leaves
the previous checkpoint as `latest`; loading never unpickles arbitrary objects. In one process, with a stand-in for the DeepSpeed engine's save/load
(the 2-process runs in test_training_faults and test_killed_rank use the real one)."""

from __future__ import annotations

import errno
import json
import logging
import os
import zlib
from pathlib import Path

import pytest
import torch

from faults.conftest import flip_byte
from mope_dist import dist
from mope_dist.distill import checkpoint as ckpt_mod
from mope_dist.distill.checkpoint import MARKER, CheckpointManager
from mope_dist.distill.safe_load import safe_torch_load, weights_only_loading
from mope_dist.errors import JobError

FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class FakeEngine:
    """engine.save_checkpoint / load_checkpoint as DeepSpeed lays them out; can fail like a full disk."""

    basic_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # its settings are kept

    def __init__(self, fail_at: str | None = None):
        self.fail_at = fail_at  # tag whose second file hits "no space left"

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"client": client_state, "w": torch.ones(64)}, d / FILES[0])
        if tag == self.fail_at:
            (d / FILES[1]).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / FILES[1]))
        torch.save({"opt": torch.zeros(64)}, d / FILES[1])

    def load_checkpoint(self, load_dir, tag, **kw):
        state = safe_torch_load(Path(load_dir) / tag / FILES[0])
        return str(Path(load_dir) / tag), state["client"]


def saved(tmp_path, steps=(2, 4), keep=3) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=keep)
    for step in steps:
        mgr.save(FakeEngine(), step, {"train_state": {"step": step}})
    return mgr


def test_tag_without_completion_marker_is_never_taken(tmp_path):
    mgr = saved(tmp_path)
    (mgr.dir / "step_00000004" / MARKER).unlink()  # as if killed before the marker was written
    assert mgr.latest() == "step_00000002"
    assert mgr.load(FakeEngine(), mgr.latest())["train_state"]["step"] == 2


def test_latest_naming_an_incomplete_tag_falls_back(tmp_path):
    mgr = saved(tmp_path)
    (mgr.dir / "step_00000006").mkdir()  # a save that had only started
    (mgr.dir / "latest").write_text("step_00000006\n")
    assert mgr.latest() == "step_00000004"


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage_marker"])
def test_damaged_checkpoint_files_are_detected(tmp_path, damage):
    mgr = saved(tmp_path)
    tag_dir = mgr.dir / "step_00000004"
    if damage == "truncate":  # cut mid-write: the marker records every file's size
        data = (tag_dir / FILES[1]).read_bytes()
        (tag_dir / FILES[1]).write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (tag_dir / FILES[0]).unlink()
    else:
        (tag_dir / MARKER).write_text('{"files": ')
    assert mgr.latest() == "step_00000002"


def test_a_flipped_byte_is_detected_and_resume_falls_back(tmp_path, caplog):
    mgr = saved(tmp_path)
    damaged = mgr.dir / "step_00000004" / FILES[1]
    size = damaged.stat().st_size
    flip_byte(damaged)  # same size: only the checksum can tell
    assert damaged.stat().st_size == size and mgr.complete_tags() == ["step_00000002", "step_00000004"]
    with caplog.at_level(logging.WARNING, logger="mope_dist"):
        assert mgr.latest() == "step_00000002"
    assert f"step_00000004 is damaged: {FILES[1]} does not match its CRC-32" in caplog.text
    assert mgr.load(FakeEngine(), mgr.latest())["train_state"]["step"] == 2
    flip_byte(mgr.dir / "step_00000002" / FILES[0])  # nothing intact left: start from the beginning
    assert mgr.latest() is None


def test_markers_without_checksums_are_still_read(tmp_path):
    """Checkpoints saved before the marker listed checksums ({name: size}) are checked by size."""
    mgr = saved(tmp_path, steps=(2,))
    tag_dir = mgr.dir / "step_00000002"
    marker = json.loads((tag_dir / MARKER).read_text())
    marker["files"] = {name: entry["size"] for name, entry in marker["files"].items()}
    (tag_dir / MARKER).write_text(json.dumps(marker))
    assert mgr.latest() == "step_00000002"
    (tag_dir / FILES[1]).write_bytes(b"truncated")
    assert mgr.latest() is None


def test_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    mgr = saved(tmp_path, steps=(2,))
    with pytest.raises(JobError) as err:
        mgr.save(FakeEngine(fail_at="step_00000004"), 4, {"train_state": {"step": 4}})
    message = str(err.value)
    assert "saving checkpoint step_00000004" in message and "No space left on device" in message
    assert "step_00000002 is intact" in message and "rerun" in message
    assert dist.failure_line(err.value) == (f"error: {message}", 1)  # one line, exit status 1
    assert not (mgr.dir / "step_00000004").exists()  # the partial tag is gone: its space is freed
    assert (mgr.dir / "latest").read_text().strip() == mgr.latest() == "step_00000002"


def test_full_disk_while_writing_the_marker(tmp_path, monkeypatch):
    mgr = saved(tmp_path, steps=(2,))

    def no_space(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt_mod, "atomic_write_json", no_space)
    with pytest.raises(JobError, match="No space left on device"):
        mgr.save(FakeEngine(), 4, {"train_state": {"step": 4}})
    assert mgr.latest() == "step_00000002" and not (mgr.dir / "step_00000004").exists()


def test_unwritable_checkpoint_directory(tmp_path):
    (tmp_path / "not_a_dir").write_text("a regular file")  # tests run as root: chmod would not stop us
    mgr = CheckpointManager(tmp_path / "not_a_dir" / "checkpoints")
    with pytest.raises(
        JobError, match=r"saving checkpoint step_00000002 .* failed on rank 0 \(NotADirectoryError"
    ):
        mgr.save(FakeEngine(), 2, {})
    assert mgr.latest() is None


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_files_load_without_arbitrary_unpickling(tmp_path):
    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        safe_torch_load(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "meta": {"step": 3}}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["meta"] == {"step": 3}


def test_deepspeed_loading_is_switched_to_weights_only_and_back(tmp_path):
    from deepspeed.checkpoint import ds_to_universal, universal_checkpoint
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    engine = type("E", (), {})()
    engine.checkpoint_engine = TorchCheckpointEngine()
    torch.save({"evil": Evil()}, tmp_path / "evil.pt")
    converters = (zero_to_fp32, ds_to_universal, universal_checkpoint)
    with weights_only_loading(engine):
        for module in converters:  # DeepSpeed's converters and universal loader read safely too
            assert module.torch.load is safe_torch_load
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            engine.checkpoint_engine.load(str(tmp_path / "evil.pt"))
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            universal_checkpoint.torch.load(tmp_path / "evil.pt", weights_only=False)
    assert all(module.torch is torch for module in converters)
    assert "load" not in vars(engine.checkpoint_engine)


def test_marker_lists_every_file_with_its_size_and_crc32(tmp_path):
    mgr = saved(tmp_path, steps=(2,))
    marker = json.loads((mgr.dir / "step_00000002" / MARKER).read_text())
    assert marker["step"] == 2
    data = {f: (mgr.dir / "step_00000002" / f).read_bytes() for f in FILES}
    assert marker["files"] == {f: {"size": len(b), "crc32": f"{zlib.crc32(b):08x}"} for f, b in data.items()}
