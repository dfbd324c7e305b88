"""Write the synthetic demo/test data: image-text training shards, a labelled zero-shot set and a
retrieval set (deterministic for a given seed).

    python tools/make_synthetic.py OUT [--train-samples 10000] [--samples-per-shard 1000] [--image-size 32]

Layout: OUT/train/{000000..}.tar + sizes.json, OUT/val/<class folders> + classnames.txt + templates.txt,
OUT/val_shards/ (the same set as shards with a `cls` field), OUT/retrieval/{000000..}.tar.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mope_dist.data.synthetic import write_image_text_shards, write_labelled_set, write_retrieval_set


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--retrieval-images", type=int, default=200)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    common = dict(image_size=args.image_size, overwrite=args.overwrite)
    paths = {
        "train": write_image_text_shards(
            args.out / "train", args.train_samples, args.samples_per_shard, seed=args.seed, **common
        ),
        "val": str(
            write_labelled_set(
                args.out / "val",
                args.val_per_class,
                seed=args.seed + 1,
                shard_dir=args.out / "val_shards",
                **common,
            )
        ),
        "val_shards": str(args.out / "val_shards"),
        "retrieval": write_retrieval_set(
            args.out / "retrieval",
            args.retrieval_images,
            args.captions_per_image,
            seed=args.seed + 2,
            **common,
        ),
    }
    print(json.dumps(paths, indent=2))
    print(f"wrote synthetic data to {args.out} in {time.perf_counter() - t0:.1f}s")
    return paths


if __name__ == "__main__":
    main()
