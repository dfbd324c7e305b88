"""Training data faults: bad samples and shards are skipped, counted per reason and logged; a shard
that cannot be opened is retried, then skipped for good; only "no shard can be read at all" stops the
loader, with a one-line error. (The skip-rate limit and per-rank counts in a real run: see
test_training_faults.)"""

from __future__ import annotations

import logging
import tarfile

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from faults.conftest import write_samples
from mope_dist import dist
from mope_dist.data import SKIP_REASONS, ImageTextLoader
from mope_dist.errors import JobError


def ids(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[int(t.split()[-1])] for t in texts])


def image(img):
    return pil_to_tensor(img.resize((8, 8)))


@pytest.fixture
def logged():
    """Lines the mope_dist logger emits during the test."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(f"{record.levelname} {record.getMessage()}")

    handler = Collect()
    logging.getLogger("mope_dist").addHandler(handler)
    yield lines
    logging.getLogger("mope_dist").removeHandler(handler)


def read_all(loader) -> list[int]:
    out = []
    for _, tokens in loader:
        out.extend(tokens.flatten().tolist())
    return out


def test_corrupt_truncated_and_missing_parts_are_skipped_and_counted(tmp_path, logged):
    write_samples(tmp_path / "a.tar", 8, start=0, no_caption=[1], bad_image=[2])
    write_samples(tmp_path / "full.tar", 8, start=100)
    cut = tarfile.open(tmp_path / "full.tar").getmembers()[6].offset_data + 5  # inside sample 103's jpg
    (tmp_path / "b.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:cut])
    (tmp_path / "c.tar").write_bytes(b"\x00garbage, not a tar" * 40)  # corrupt from the first byte
    spec = [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar")]
    # in order (no shuffle), an epoch longer than the good samples: every shard is read, then a.tar again
    loader = ImageTextLoader(
        spec, image, ids, batch_size=3, samples_per_epoch=12, shuffle_buffer=1, retry_delay=0.0
    )
    got = read_all(loader)
    assert len(got) == 12  # full batches of good samples only
    assert set(got) == {0, 3, 4, 5, 6, 7, 100, 101, 102}
    assert loader.skipped() == {
        **dict.fromkeys(SKIP_REASONS, 0),
        "missing_caption": 2,  # a.tar read twice
        "empty_caption": 0,
        "bad_image": 2,
        "truncated_shard": 1,
        "unreadable_shard": 1,  # c.tar is not opened again
    }
    assert loader.sample_counts() == {"used": 12, "skipped": 4}
    errors = [line for line in logged if line.startswith("ERROR")]
    assert any("truncated_shard" in e and "b.tar" in e for e in errors)
    assert any("unreadable_shard" in e and "c.tar" in e for e in errors)


def test_shard_that_cannot_be_opened_is_retried_then_skipped_for_good(tmp_path, logged):
    write_samples(tmp_path / "000000.tar", 6)
    spec = str(tmp_path / "{000000..000001}.tar")  # 000001.tar does not exist
    loader = ImageTextLoader(
        spec, image, ids, batch_size=2, samples_per_epoch=6, mode="resampled", retries=3, retry_delay=0.0
    )
    for _ in range(3):  # epochs: the missing shard is drawn again and again
        assert len(read_all(loader)) == 6
    retries = [line for line in logged if "retrying shard" in line and "000001.tar" in line]
    skips = [line for line in logged if "after 3 attempts" in line and "000001.tar" in line]
    assert len(retries) == 2 and len(skips) == 1  # 3 attempts, then never opened again
    assert loader.skipped()["unreadable_shard"] == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_no_readable_shard_at_all_stops_with_one_line(tmp_path, workers):
    spec = [f"pipe:cat {tmp_path}/gone{i}.tar" for i in range(3)] + ["memory://mope_faults/none.tar"]
    loader = ImageTextLoader(
        spec, image, ids, batch_size=2, num_workers=workers, samples_per_epoch=8, retry_delay=0
    )
    with pytest.raises(JobError) as err:
        read_all(loader)
    line, status = dist.failure_line(err.value)
    assert status == 1 and "\n" not in line
    assert line.startswith("error: no shard of the 4 in the spec can be read (each tried 3 times")


def test_all_local_shards_missing_is_an_error_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard"):
        ImageTextLoader(str(tmp_path / "{0..3}.tar"), image, ids, batch_size=2, samples_per_epoch=8)
