"""What tools/eval_zeroshot.py and tools/eval_retrieval.py share: model options, early input checks,
the JSON result line, and one-line errors.

Teacher and student go through the same code: an open_clip model (name + pretrained tag or weights file,
`local-dir:`, `hf-hub:`) is imported into a PrunableCLIP by mope_dist.model.load_teacher, exactly like a
standalone model directory; `--native` evaluates the open_clip module itself instead (a cross-check of
the import).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from mope_dist import dist
from mope_dist.data.shards import expand_shards
from mope_dist.model import load_teacher
from mope_dist.model.io import is_model_dir
from mope_dist.utils import atomic_write_json, is_local_path

PRECISIONS = {"auto": None, "bf16": True, "fp32": False}  # -> the `autocast` argument of the evaluators


class InputError(ValueError):
    """Bad user input, reported as one line with exit status 2."""


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help="mope-dist model directory, or an open_clip model name / local-dir:DIR / hf-hub:ORG/REPO",
    )
    g.add_argument("--pretrained", help="open_clip pretrained tag or weights file (open_clip models only)")
    g.add_argument("--native", action="store_true", help="evaluate the open_clip module without importing it")
    g.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="auto",
        help="auto: bf16 autocast on GPU, fp32 on CPU",
    )
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--output", type=Path, help="also write the JSON result to this file (atomically)")
    # the `deepspeed` launcher passes --local_rank unless told --no_local_rank; the env var is what counts
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def check_model_args(args: argparse.Namespace) -> None:
    """Catch a wrong --model/--pretrained before anything slow is loaded."""
    name, pretrained = args.model, args.pretrained
    if args.batch_size <= 0:
        raise InputError(f"--batch-size must be > 0, got {args.batch_size}")
    if os.path.isdir(name):
        if not is_model_dir(name):
            raise InputError(
                f"{name} is not a mope-dist model directory (config.json + model.safetensors); "
                f"for an open_clip folder pass --model local-dir:{name}"
            )
        if pretrained or args.native:
            raise InputError("--pretrained and --native apply to open_clip models, not to a model directory")
        return
    if name.startswith("local-dir:"):
        if not (Path(name.removeprefix("local-dir:")) / "open_clip_config.json").is_file():
            raise InputError(f"{name}: no open_clip_config.json in that directory")
    elif name.startswith("hf-hub:"):
        pass
    elif os.sep in name or name.startswith("."):
        raise InputError(f"model directory {name} not found")
    elif open_clip.get_model_config(name) is None:
        raise InputError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    if (
        pretrained
        and (os.sep in pretrained or os.path.splitext(pretrained)[1])
        and not os.path.isfile(pretrained)
    ):
        raise InputError(f"pretrained weights file {pretrained} not found")


def check_shards(spec: str) -> None:
    """Every local shard named by `spec` exists (remote ones are checked when read)."""
    try:
        urls = [u for urls, _ in expand_shards(spec) for u in urls]
    except ValueError as e:
        raise InputError(str(e)) from e
    missing = [u for u in urls if is_local_path(u) and not os.path.exists(u)]
    if len(urls) == 1 and missing:
        raise InputError(f"{missing[0]} not found")
    if missing:
        raise InputError(f"{len(missing)} of {len(urls)} shards not found (first: {missing[0]})")


def load_eval_model(args: argparse.Namespace, device: torch.device):
    """-> (model in eval mode on `device`, preprocess_val, tokenizer)."""
    if args.native:
        model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
        tokenizer = open_clip.get_tokenizer(args.model)
    else:
        model, _, preprocess, tokenizer = load_teacher(args.model, args.pretrained)
    return model.to(device).eval(), preprocess, tokenizer


class LateTransform:
    """A preprocess fixed only once the model is loaded, so the data can be checked before that."""

    fn: Callable | None = None

    def __call__(self, image):
        return self.fn(image)


def emit(result: dict, output: Path | None) -> None:
    """Rank 0 prints the result as one JSON line on stdout and, with --output, writes it atomically."""
    if not dist.is_main():
        return
    if output is not None:
        atomic_write_json(output, result)
    print(json.dumps(result), flush=True)


def run_tool(prog: str, main: Callable[[list[str] | None], dict], argv: list[str] | None = None) -> dict:
    """Run `main`; input errors become `prog: error: <first line>` on stderr and exit status 2."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{prog}: error: {lines[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
