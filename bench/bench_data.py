"""Data pipeline throughput: mope_dist's ImageTextLoader vs open_clip_train's get_wds_dataset, same run.

    .venv/bin/python bench/bench_data.py                      # synthetic shards written to a temp dir
    .venv/bin/python bench/bench_data.py --shards 'data/train/{000000..000009}.tar' --workers 4
    .venv/bin/python bench/bench_data.py --image-size 450 --model-size 224 --workers 1 --samples 1600 --no-open-clip

Both pipelines read the same shards with the same open_clip train transform, tokenizer, batch size and
worker count and are timed over full epochs (samples/s); the ratio ours/open_clip is the figure
(goal >= 1.0). Beside it, the loader as the job runs it: uint8 images (data.image_dtype, default), and
with data.decode=device the workers' share (JPEG headers and crops only). With --workers 1, samples/s
is per CPU core. "cold" epochs include starting the workers, "warm" ones reuse them (both pipelines keep
persistent workers). Runs interleave the two pipelines and keep each one's best of several repeats, so a
busy shared CPU slows both sides alike.

open_clip_train (shipped with open_clip_torch) needs pandas, which the project does not depend on:
`.venv/bin/pip install pandas` for this benchmark. Its grouping code crashes on webdataset 1.x's empty
`{}` record at each shard end (KeyError: 'fname'); the benchmark wraps it to drop those records.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch

from mope_dist.data import ImageTextLoader, expand_shards, shard_sizes
from mope_dist.data.device import split_decode, split_normalize
from mope_dist.data.synthetic import write_image_text_shards


def open_clip_loader(args, preprocess, tokenizer, num_samples: int):
    try:
        from open_clip_train import data as oc_data
    except ImportError as exc:
        raise SystemExit(
            f"open_clip_train needs pandas for this benchmark: .venv/bin/pip install pandas ({exc})"
        ) from exc
    original = oc_data.group_by_keys_nothrow
    if not getattr(original, "drops_empty_records", False):

        def group_by_keys_nothrow(data, *a, **kw):
            return original((s for s in data if "fname" in s), *a, **kw)

        group_by_keys_nothrow.drops_empty_records = True
        oc_data.group_by_keys_nothrow = group_by_keys_nothrow
    oc_args = SimpleNamespace(
        train_data=args.shards,
        train_num_samples=num_samples,
        dataset_resampled=args.mode == "resampled",
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=args.batch_size,
        workers=args.workers,
        world_size=1,
    )
    info = oc_data.get_wds_dataset(
        oc_args, preprocess, is_train=True, epoch=0, floor=True, tokenizer=tokenizer
    )
    info.num_batches = info.dataloader.num_batches
    return info


def time_epoch(loader, epoch: int) -> tuple[float, int]:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    it = loader.dataloader if hasattr(loader, "dataloader") else loader
    t0 = time.perf_counter()
    n = 0
    for i, (images, _tokens) in enumerate(it):
        n += len(images)
        if i + 1 == loader.num_batches:
            break
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="shard spec (default: synthetic shards in a temp dir)")
    ap.add_argument("--samples", type=int, default=8000, help="synthetic samples to write")
    ap.add_argument("--image-size", type=int, default=64, help="synthetic image side (px)")
    ap.add_argument("--model-size", type=int, default=32, help="transform output side (px)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", choices=["finite", "resampled"], default="finite")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--no-open-clip", action="store_true", help="skip open_clip_train's loader (needs pandas)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            args.shards = write_image_text_shards(
                Path(tmp) / "shards", args.samples, max(1, args.samples // 8), image_size=args.image_size
            )
        urls = [u for urls, _ in expand_shards(args.shards) for u in urls]
        num_samples = sum(s for s in shard_sizes(urls) if s is not None) or args.samples
        preprocess = open_clip.image_transform(args.model_size, is_train=True)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        uint8_tf, _ = split_normalize(preprocess)
        kwargs = dict(mode=args.mode, samples_per_epoch=num_samples)
        loaders = {
            "ours": ImageTextLoader(
                args.shards, preprocess, tokenizer, args.batch_size, args.workers, **kwargs
            ),
            # what the job's workers do: data.image_dtype uint8 (default), and data.decode device, whose
            # workers only read JPEG headers and draw crops (the decoding then happens on the device)
            "ours_uint8": ImageTextLoader(
                args.shards, uint8_tf, tokenizer, args.batch_size, args.workers, **kwargs
            ),
            "ours_device_decode": ImageTextLoader(
                args.shards, split_decode(uint8_tf)[0], tokenizer, args.batch_size, args.workers, **kwargs
            ),
        }
        if not args.no_open_clip:
            loaders["open_clip"] = open_clip_loader(args, preprocess, tokenizer, num_samples)
        print(
            f"{len(urls)} shards, {num_samples} samples, {args.image_size} px JPEGs -> {args.model_size} px, "
            f"batch {args.batch_size}, {args.workers} workers, mode {args.mode}; batches/epoch "
            + ", ".join(f"{name} {loader.num_batches}" for name, loader in loaders.items())
        )
        best = {(name, phase): 0.0 for name in loaders for phase in ("cold", "warm")}
        for rep in range(args.repeats):
            for name, loader in loaders.items():
                phase = "cold" if rep == 0 else "warm"
                rate, n = time_epoch(loader, rep)
                best[name, phase] = max(best[name, phase], rate)
                print(f"  rep {rep} {name:18s} {phase}: {rate:8.0f} samples/s ({n} samples)")
        for phase in ("cold", "warm"):
            rates = ", ".join(
                f"{name} {best[name, phase]:.0f} ({best[name, phase] / args.workers:.0f}/worker)"
                for name in loaders
            )
            print(f"{phase}: samples/s {rates}")
            o, t = best["ours", phase], best.get(("open_clip", phase))
            if t:
                print(f"{phase}: ours / open_clip {o / t:.2f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
