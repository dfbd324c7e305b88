"""Cost of the per-file checksum in a checkpoint's completion marker, against reading and saving the file.

    .venv/bin/python bench/bench_checksum.py [--mb 100] [--repeats 3]

Writes one float32 tensor of about `--mb` MB with torch.save (as DeepSpeed does), then times, best of
`--repeats` each (the file is in the page cache after the first read, as it is right after a save):
- read: reading the file in 8 MiB blocks and doing nothing else (the floor for any checksum);
- each checksum candidate over the same blocks (mope_dist.distill.checkpoint uses file_checksum);
- save: torch.save of the tensor (what a checkpoint costs anyway).
Prints MB/s and each time as a ratio of the read and of the save.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import zlib
from pathlib import Path

import torch

from mope_dist.distill.checkpoint import CHUNK, file_checksum


def read_only(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def hashed(factory):
    def run(path: Path) -> None:
        h = factory()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        h.hexdigest()

    return run


def crc32(path: Path) -> None:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            value = zlib.crc32(block, value)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tensor = torch.randn(args.mb * 2**20 // 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        save = best(lambda: torch.save(tensor, path), args.repeats)
        size_mb = path.stat().st_size / 2**20
        read = best(lambda: read_only(path), args.repeats)
        candidates = {
            "file_checksum (used)": lambda: file_checksum(path),
            "zlib.crc32": lambda: crc32(path),
            "blake2b": lambda: hashed(hashlib.blake2b)(path),
            "sha256": lambda: hashed(hashlib.sha256)(path),
        }
        print(f"file {size_mb:.0f} MB; read {size_mb / read:.0f} MB/s; torch.save {size_mb / save:.0f} MB/s")
        for name, fn in candidates.items():
            t = best(fn, args.repeats)
            print(
                f"{name:22s} {t * 1000:7.1f} ms  {size_mb / t:6.0f} MB/s  x{t / read:5.2f} of read  "
                f"x{t / save:5.2f} of save"
            )


if __name__ == "__main__":
    main()
