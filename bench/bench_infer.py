"""Inference throughput: pruned vs unpruned, and the imported model vs open_clip's own, same run.

    .venv/bin/python bench/bench_infer.py                       # ViT-B/32-like, width 512, CPU
    .venv/bin/python bench/bench_infer.py --layers 12 --threads 0 --batch 32
    python bench/bench_infer.py --device cuda --bf16 --width 768 --patch 16 --layers 12 --batch 256
    .venv/bin/python bench/bench_infer.py --onnx                # + onnxruntime (needs the export extra)

1. open_clip CLIP (random weights) vs the same weights imported into PrunableCLIP: images/s, texts/s;
   goal ratio >= 0.95 (the own attention module must not cost speed).
2. PrunableCLIP vs a copy sliced to half of every layer's heads and MLP neurons (about half the FLOPs):
   speed-up vs FLOPs ratio; goal >= 0.8 of the FLOPs ratio (pruning must turn into real speed).
3. --onnx: both models exported with tools/export_onnx.py's code (fp32, parity-checked), run on
   onnxruntime's CPU provider with the same thread count beside PyTorch: what pruning buys at deployment.

Timings interleave the models and keep each one's best of several repeats, so a busy shared CPU
slows both sides alike instead of biasing one.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from mope_dist.model import KeepSpec, TowerKeep, count_flops, format_counts_table, from_open_clip, slice_model


def build_open_clip(args) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=512,
        vision_cfg=dict(
            image_size=224, patch_size=args.patch, width=args.width, layers=args.layers, head_width=64
        ),
        text_cfg=dict(
            context_length=77, width=args.text_width, heads=args.text_width // 64, layers=args.layers
        ),
        quick_gelu=True,  # like the OpenAI checkpoints
    ).eval()


def half_keep(model) -> KeepSpec:
    """Every second head and neuron of every layer: ~half the FLOPs at unchanged depth."""

    def tower(t):
        return TowerKeep(
            layers=list(range(len(t.blocks))),
            heads={i: list(range(0, b.num_heads, 2)) for i, b in enumerate(t.blocks)},
            mlp={i: list(range(0, b.mlp_dim, 2)) for i, b in enumerate(t.blocks)},
        )

    return KeepSpec(vision=tower(model.visual), text=tower(model.text))


def throughput(fns: dict, x: torch.Tensor, repeats: int, amp) -> dict[str, float]:
    """Items/s per function, best of `repeats` interleaved rounds."""
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    best = dict.fromkeys(fns, float("inf"))
    with torch.inference_mode(), amp():
        for fn in fns.values():  # warm-up
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn(x)
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: x.shape[0] / t for name, t in best.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--text-width", type=int, default=384)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    p.add_argument("--onnx", action="store_true", help="also onnxruntime CPU throughput (export extra)")
    args = p.parse_args()
    if args.onnx and args.device != "cpu":
        p.error("--onnx compares onnxruntime's CPU provider with PyTorch on the CPU: use --device cpu")
    if args.threads:  # one thread by default: OpenMP spin-waiting on a shared CPU box swamps the timings
        torch.set_num_threads(args.threads)

    oc = build_open_clip(args)
    model = from_open_clip(oc)
    pruned = slice_model(model, half_keep(model))
    oc, model, pruned = (m.to(args.device) for m in (oc, model, pruned))
    amp = (lambda: torch.autocast(args.device, torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    print(format_counts_table(model, pruned, names=("unpruned", "pruned")))
    print(
        f"{args.device}, torch threads {torch.get_num_threads()}, batch {args.batch}, best of {args.repeats}\n"
    )

    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    texts = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat sitting on a red chair"] * args.batch)
    texts = texts.to(args.device)
    with torch.inference_mode():  # same function before timing it
        assert torch.allclose(oc.encode_image(images), model.encode_image(images), atol=1e-4)

    img = throughput(
        {"open_clip": oc.encode_image, "ours": model.encode_image, "pruned": pruned.encode_image},
        images,
        args.repeats,
        amp,
    )
    txt = throughput(
        {"open_clip": oc.encode_text, "ours": model.encode_text, "pruned": pruned.encode_text},
        texts,
        args.repeats,
        amp,
    )
    f_full, f_pruned = count_flops(model), count_flops(pruned)
    print(
        f"{'':<10}{'open_clip/s':>12}{'ours/s':>10}{'pruned/s':>10}{'ours/oc':>9}{'speed-up':>10}"
        f"{'FLOPs x':>9}{'eff.':>7}"
    )
    for label, r, key in (("images", img, "image"), ("texts", txt, "text")):
        flops_x = f_full[key] / f_pruned[key]
        speedup = r["pruned"] / r["ours"]
        print(
            f"{label:<10}{r['open_clip']:>12.1f}{r['ours']:>10.1f}{r['pruned']:>10.1f}"
            f"{r['ours'] / r['open_clip']:>9.3f}{speedup:>10.2f}{flops_x:>9.2f}{speedup / flops_x:>7.2f}"
        )
    print(
        "\nours/oc: imported vs open_clip throughput (goal >= 0.95); eff.: speed-up / FLOPs ratio (goal >= 0.8)"
    )
    if args.onnx:
        bench_onnx(args, {"unpruned": model, "pruned": pruned}, images, texts)


def bench_onnx(args, models: dict, images: torch.Tensor, texts: torch.Tensor) -> None:
    """onnxruntime (CPU, same thread count) and PyTorch on the same models, timed interleaved."""
    import onnxruntime

    from mope_dist.model.onnx_export import IMAGE_FILE, TEXT_FILE, export_onnx, ort_session

    threads = args.threads or torch.get_num_threads()
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, m in models.items():
            t0 = time.perf_counter()
            export_onnx(m, Path(tmp) / name)
            print(f"exported {name} in {time.perf_counter() - t0:.0f} s (onnxruntime vs PyTorch checked)")
            sessions[name] = {f: ort_session(Path(tmp) / name / f, threads) for f in (IMAGE_FILE, TEXT_FILE)}
        for label, file, x, encode in (
            ("images", IMAGE_FILE, images, "encode_image"),
            ("texts", TEXT_FILE, texts, "encode_text"),
        ):
            fns = {}
            for name, m in models.items():
                session = sessions[name][file]
                feed = session.get_inputs()[0].name
                fns[f"torch {name}"] = getattr(m, encode)
                fns[f"ort {name}"] = lambda x, s=session, i=feed: s.run(None, {i: x.numpy()})
            rates[label] = throughput(fns, x, args.repeats, contextlib.nullcontext)
    print(
        f"\nonnxruntime {onnxruntime.__version__} CPU vs PyTorch, {threads} threads, batch {args.batch}, fp32"
    )
    print(
        f"{'':<10}{'torch/s':>9}{'ort/s':>9}{'ort/torch':>10}{'pruned: torch/s':>17}{'ort/s':>9}"
        f"{'ort/torch':>10}{'ort speed-up':>14}"
    )
    for label, r in rates.items():
        print(
            f"{label:<10}{r['torch unpruned']:>9.1f}{r['ort unpruned']:>9.1f}"
            f"{r['ort unpruned'] / r['torch unpruned']:>10.2f}{r['torch pruned']:>17.1f}{r['ort pruned']:>9.1f}"
            f"{r['ort pruned'] / r['torch pruned']:>10.2f}{r['ort pruned'] / r['ort unpruned']:>14.2f}"
        )
    print("ort speed-up: pruned vs unpruned, both on onnxruntime")


if __name__ == "__main__":
    main()
