"""Export a model directory's image and text towers to ONNX, checked against onnxruntime on the spot.

    python tools/export_onnx.py MODEL_DIR OUT_DIR [--dtype fp32|fp16] [--opset 18] [--image-size N|HxW]
                                [--image FILE ...] [--caption TEXT ...] [--overwrite]

Writes OUT_DIR/image_encoder.onnx (float32 pixels [batch, 3, H, W]), text_encoder.onnx (int64 token ids
[batch, context_length]) and export.json (input/output names and shapes, preprocess, tokenizer, logit
scale, provenance, the comparison's results). Both output raw float32 embeddings (not normalised), also
with --dtype fp16 (fp16 weights and arithmetic inside). MODEL_DIR is any model directory the project
writes (teacher import, pruned, distilled, converted).

Before OUT_DIR appears (it is written in a temp dir, then renamed), onnxruntime's outputs are compared
with the PyTorch model in fp32: random inputs at batch 1 and 3, and real ones: images through the model's
preprocess and captions through its tokenizer (--image / --caption; default: a few rendered scenes with
their captions). fp32 must agree within 1e-4 (max abs difference), fp16 within 1e-2 (relative L2 error
of each embedding). --image-size serves another input resolution: the positional-embedding grid is resized
like open_clip does (bicubic) and the comparison is with that resized model.

Bad input: one line, exit 2, before the model is loaded. A failed comparison: one line, exit 1, nothing
written. On success one JSON summary line on stdout. Needs `pip install 'mope-dist[export]'`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

from PIL import Image

from mope_dist.errors import ConfigError, JobError
from mope_dist.model import CLIPSpec, load_model
from mope_dist.model.io import is_model_dir, read_config

EXPORT_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
SCENES = (  # default real images: rendered scenes, cropped off-square so the resize and crop matter
    {"colour": "red", "shape": "circle", "size": "large", "position": "center", "background": "white"},
    {"colour": "blue", "shape": "square", "size": "small", "position": "top left", "background": "gray"},
    {
        "colour": "yellow",
        "shape": "triangle",
        "size": "medium",
        "position": "bottom right",
        "background": "black",
    },
)


def default_samples() -> tuple[list[Image.Image], list[str]]:
    from mope_dist.data.synthetic import CAPTION_TEMPLATES, render

    images = [render(s, random.Random(i), 160).crop((0, 20, 160, 140)) for i, s in enumerate(SCENES)]
    return images, [CAPTION_TEMPLATES[0].format(**s) for s in SCENES]


def parse_size(text: str) -> list[int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ConfigError(f"--image-size must be N or HxW, got {text!r}")
    return parts * (3 - len(parts))


def check_inputs(args: argparse.Namespace) -> dict:
    """Everything that can be wrong with the command line, before anything slow; -> the model's config."""
    model_dir, out = args.model_dir, args.out_dir
    if not model_dir.exists():
        raise ConfigError(f"model directory {model_dir} not found")
    try:
        is_model = model_dir.is_dir() and is_model_dir(model_dir)
        config = read_config(model_dir) if is_model else None
        spec = CLIPSpec.from_dict(config["spec"]) if is_model else None
    except (ValueError, TypeError, KeyError) as e:  # unreadable config.json or spec
        raise ConfigError(f"{model_dir}/config.json is not a valid model config: {e}") from e
    if not is_model:
        raise ConfigError(f"{model_dir} is not a mope-dist model directory (config.json + model.safetensors)")
    if out.resolve() == model_dir.resolve():
        raise ConfigError("OUT_DIR must not be MODEL_DIR")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {out} already exists (pass --overwrite to replace it)")
    for path in args.image or []:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, SyntaxError) as e:
            raise ConfigError(f"--image {path}: cannot be read as an image ({e})") from e
    if args.caption is not None and not all(c.strip() for c in args.caption):
        raise ConfigError("--caption must not be empty")
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: pip install 'mope-dist[export]'")
    if args.opset is not None:
        import onnx

        if not 7 <= args.opset <= onnx.defs.onnx_opset_version():
            raise ConfigError(
                f"--opset {args.opset}: onnx {onnx.__version__} knows opsets 7 to {onnx.defs.onnx_opset_version()}"
            )
    if args.image_size:
        from mope_dist.model.onnx_export import check_image_size

        try:
            check_image_size(spec.vision, parse_size(args.image_size))
        except ValueError as e:
            raise ConfigError(f"--image-size {args.image_size}: {e}") from e
    return config


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "model_dir", type=Path, help="mope-dist model directory (config.json + model.safetensors)"
    )
    ap.add_argument("out_dir", type=Path, help="directory to write the ONNX files and export.json into")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weights and arithmetic")
    ap.add_argument("--opset", type=int, help="ONNX opset (default 18, the exporter's own)")
    ap.add_argument("--image-size", help="serve N or HxW images instead of the model's own size")
    ap.add_argument("--image", action="append", type=Path, help="image file for the check (repeatable)")
    ap.add_argument("--caption", action="append", help="caption for the check (repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    try:
        config = check_inputs(args)
    except ConfigError as e:
        print(f"export_onnx: error: {e}", file=sys.stderr)
        sys.exit(2)

    from mope_dist.model.onnx_export import DEFAULT_OPSET, export_onnx, sample_cases, with_image_size

    model = load_model(args.model_dir).float()
    if args.image_size:
        model = with_image_size(model, parse_size(args.image_size))
    images, captions = default_samples()
    if args.image:
        images = [Image.open(p).convert("RGB") for p in args.image]
    captions = args.caption or captions
    provenance = {"model_dir": str(args.model_dir.resolve()), "model": config.get("provenance", {})}
    if args.image_size:
        provenance["image_size_changed_from"] = config["spec"]["vision"]["image_size"]
    try:
        meta = export_onnx(
            model,
            args.out_dir,
            dtype=args.dtype,
            opset=args.opset or DEFAULT_OPSET,
            cases=sample_cases(model, images, captions),
            provenance=provenance,
            overwrite=args.overwrite,
        )
    except JobError as e:
        print(f"export_onnx: error: {e}", file=sys.stderr)
        sys.exit(1)
    parity = meta["parity"]
    worst = {
        t: {k: max(r[k] for r in parity[t]) for k in ("max_abs_diff", "max_rel_diff")}
        for t in ("image", "text")
    }
    summary = {
        "output": str(args.out_dir),
        "dtype": args.dtype,
        "opset": meta["opset"],
        "image_input": meta["image_encoder"]["input"],
        "text_input": meta["text_encoder"]["input"],
        "parity": {"criterion": parity["criterion"], **worst},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
