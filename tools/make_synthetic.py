"""Write the synthetic demo/test data: image-text training shards, a labelled zero-shot evaluation set,
a separate labelled MoPE proxy set, and retrieval pairs (held-out and proxy), deterministic for a seed.

    python tools/make_synthetic.py OUT [--train-samples 10000] [--samples-per-shard 1000] [--image-size 32]
        [--val-per-class 20] [--proxy-per-class 10] [--retrieval-images 200] [--retrieval-proxy-images 100]

Layout: OUT/train/{000000..}.tar + sizes.json, OUT/val/<class folders> + classnames.txt + templates.txt
(evaluation), OUT/val_shards/ (the same set as shards with a `cls` field), OUT/proxy/ (the MoPE proxy,
same layout as val/, other images), OUT/retrieval/{000000..}.tar (held-out pairs, 100 images a
shard), OUT/retrieval_proxy/ (proxy pairs). Each split has its own seed: the proxy that chooses what
to prune shares no image with the sets that measure the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mope_dist.data.synthetic import write_demo_data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--proxy-per-class", type=int, default=10)
    ap.add_argument("--retrieval-images", type=int, default=200)
    ap.add_argument("--retrieval-proxy-images", type=int, default=100)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = write_demo_data(
        args.out,
        train_samples=args.train_samples,
        samples_per_shard=args.samples_per_shard,
        val_per_class=args.val_per_class,
        proxy_per_class=args.proxy_per_class,
        retrieval_images=args.retrieval_images,
        retrieval_proxy_images=args.retrieval_proxy_images,
        captions_per_image=args.captions_per_image,
        image_size=args.image_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps(paths, indent=2))
    print(f"wrote synthetic data to {args.out} in {time.perf_counter() - t0:.1f}s")
    return paths


if __name__ == "__main__":
    main()
