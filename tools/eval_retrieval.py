"""Image-text retrieval recall (R@1/5/10, image->text and text->image) of a mope-dist model directory or
an open_clip model, on image-text shards with one or several captions per image.

    python tools/eval_retrieval.py --model MODEL_DIR --data 'coco_test-{0000..0004}.tar'
    python tools/eval_retrieval.py --model ViT-B-32 --pretrained openai --data flickr30k_test/

Captions come from each sample's json ({"captions": [...]} or {"caption": ...}) or its txt (one per
line). The set is held in memory on every rank; under torchrun/deepspeed the ranks share the encoding.
Prints one JSON line (i2t_R@k, t2i_R@k, mean_recall, n_images, n_texts, ...) on stdout.
"""

from __future__ import annotations

import argparse

from mope_dist import dist
from mope_dist.data import load_retrieval_set
from mope_dist.eval import evaluate_retrieval
from mope_dist.recipes.eval_cli import (
    PRECISIONS,
    add_model_args,
    check_model_args,
    check_shards,
    emit,
    load_eval_model,
    run_tool,
)
from mope_dist.utils import get_logger

log = get_logger("mope_dist.eval")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--data", required=True, help="image-text shard spec (or a directory of .tar shards)")
    ap.add_argument("--max-images", type=int, help="use only the first N images (and their captions)")
    args = ap.parse_args(argv)

    info = dist.init_distributed()
    check_model_args(args)
    check_shards(args.data)
    model, preprocess, tokenizer = load_eval_model(args, info.device)
    data = load_retrieval_set(args.data, preprocess, tokenizer, max_images=args.max_images)
    result = evaluate_retrieval(
        model, *data, info.device, batch_size=args.batch_size, autocast=PRECISIONS[args.precision]
    )
    result = {
        "task": "retrieval",
        "model": args.model,
        "pretrained": args.pretrained,
        "data": args.data,
        **result,
        "world_size": info.world_size,
    }
    log.info(
        f"retrieval mean recall {result['mean_recall']:.4f} (i2t R@1 {result['i2t_R@1']:.4f}, "
        f"t2i R@1 {result['t2i_R@1']:.4f}) on {result['n_images']} images / {result['n_texts']} texts"
    )
    emit(result, args.output)
    return result


if __name__ == "__main__":
    run_tool("eval_retrieval", main)
