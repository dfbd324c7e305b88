"""Zero-shot classification accuracy of a mope-dist model directory or an open_clip model.

    python tools/eval_zeroshot.py --model MODEL_DIR --data /data/imagenet/val
    python tools/eval_zeroshot.py --model ViT-B-32 --pretrained openai --data /data/imagenet/val
    torchrun --nproc_per_node 8 tools/eval_zeroshot.py --model out/final --data 'val-{000..063}.tar' \
        --classnames imagenet --templates openai --output result.json

--data is an ImageFolder (class folders in sorted order = class index; ImageNet val's wnid folders line
up with open_clip's ImageNet class names) or labelled shards with a `cls` field. Class names default to
DATA/classnames.txt if present, else 'imagenet'; templates to DATA/templates.txt, else 'openai'.
Under torchrun/deepspeed each rank reads a disjoint part and the counts are summed, so the numbers
equal a single-process run. Prints one JSON line (top1, top5, n, images_per_s, ...) on stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mope_dist import dist
from mope_dist.data import load_classnames, load_templates, make_labelled_loader
from mope_dist.eval import build_classifier, evaluate_zeroshot
from mope_dist.recipes.eval_cli import (
    PRECISIONS,
    LateTransform,
    add_model_args,
    check_model_args,
    check_shards,
    emit,
    load_eval_model,
    run_tool,
)
from mope_dist.utils import get_logger

log = get_logger("mope_dist.eval")


def default_list(data: str, given: str | None, filename: str, fallback: str) -> str:
    if given is not None:
        return given
    beside = Path(data) / filename
    return str(beside) if beside.is_file() else fallback


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--data", required=True, help="ImageFolder directory or labelled shard spec")
    ap.add_argument("--classnames", help="'imagenet' or a file, one name per line")
    ap.add_argument("--templates", help="'openai', 'simple', or a file of format strings with {}")
    ap.add_argument("--max-per-class", type=int, help="evaluate at most this many images per class")
    ap.add_argument("--workers", type=int, default=4, help="data loader workers per rank")
    args = ap.parse_args(argv)

    info = dist.init_distributed()
    check_model_args(args)
    if not Path(args.data).is_dir():
        check_shards(args.data)
    classnames = load_classnames(default_list(args.data, args.classnames, "classnames.txt", "imagenet"))
    templates = load_templates(default_list(args.data, args.templates, "templates.txt", "openai"))
    preprocess = LateTransform()
    loader = make_labelled_loader(
        args.data,
        preprocess,
        args.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        max_per_class=args.max_per_class,
        num_workers=args.workers,
        classnames=classnames,
    )

    model, preprocess.fn, tokenizer = load_eval_model(args, info.device)
    autocast = PRECISIONS[args.precision]
    classifier = build_classifier(model, classnames, templates, tokenizer, info.device, autocast=autocast)
    result = evaluate_zeroshot(model, loader, classifier, info.device, autocast=autocast)
    skipped = loader.skipped()
    totals = dist.all_reduce_sum(
        torch.tensor(list(skipped.values()), dtype=torch.float64, device=info.device)
    )
    result = {
        "task": "zeroshot",
        "model": args.model,
        "pretrained": args.pretrained,
        "data": args.data,
        **result,
        "num_classes": len(classnames),
        "num_templates": len(templates),
        "world_size": info.world_size,
        "skipped": {k: int(v) for k, v in zip(skipped, totals.tolist(), strict=True)},
    }
    log.info(
        f"zero-shot top1 {result['top1']:.4f} top5 {result['top5']:.4f} on {result['n']} images "
        f"({result['images_per_s']:.1f} images/s)"
    )
    emit(result, args.output)
    return result


if __name__ == "__main__":
    run_tool("eval_zeroshot", main)
