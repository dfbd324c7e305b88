"""MoPE scoring engine vs the naive reference (slice each unit out, evaluate the full model), same run;
then the cost of iterative scoring (mope.rounds) against one round.

    .venv/bin/python bench/bench_score.py                 # 4-layer tiny CLIP, both proxies, CPU
    .venv/bin/python bench/bench_score.py --proxy retrieval --layers 6 --width 256
    .venv/bin/python bench/bench_score.py --rounds 2 3 5 --skip-naive

Both score the same model, proxy set and candidate list; their integer counts must be identical
(asserted; tests/test_mope.py also compares the log-probability tie-breaker, which the naive loop
here skips, as it did before the engine computed it: it needs no extra forward there). Prints
wall times, candidates/s and the speed-up (also as a ratio of process CPU time, steadier than wall
time on a shared box). Rounds are timed towards the demo's targets (half the layers, heads and MLP
width of both towers). One intra-op thread by default: on a shared CPU box OpenMP spin-waiting makes
tiny-model timings meaningless (--threads to change).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import open_clip
import torch
import torch.nn.functional as F

from mope_dist.config import TowerTarget
from mope_dist.model import from_open_clip
from mope_dist.mope.engine import score_mope
from mope_dist.mope.proxies import ClassificationProxy, RetrievalProxy
from mope_dist.mope.reference import score_mope_naive
from mope_dist.mope.units import enumerate_units
from mope_dist.prune.rounds import score_in_rounds

CONTEXT = 16


def tiny_clip(layers: int, width: int, head_width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg={
            "layers": layers,
            "width": width,
            "head_width": head_width,
            "patch_size": 8,
            "image_size": 32,
        },
        text_cfg={
            "context_length": CONTEXT,
            "vocab_size": 49408,
            "width": width,
            "heads": width // head_width,
            "layers": layers,
        },
    )
    return from_open_clip(model.eval()).eval()


def random_tokens(n: int, g: torch.Generator) -> torch.Tensor:
    """SOT, random words, EOT (the highest id: the pooling position), zero padding."""
    out = torch.zeros(n, CONTEXT, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(4, CONTEXT + 1, (1,), generator=g))
        out[i, 0] = 49406
        out[i, 1 : length - 1] = torch.randint(1, 49406, (length - 2,), generator=g)
        out[i, length - 1] = 49407
    return out


def make_proxy(kind: str, model, n_images: int, classes: int, templates: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 32, 32, generator=g)
    if kind == "retrieval":
        n_txt = 2 * n_images
        return RetrievalProxy(images, random_tokens(n_txt, g), torch.arange(n_txt) % n_images)
    class_texts = random_tokens(classes * templates, g).view(classes, templates, -1)
    device = model.logit_scale.device
    with torch.no_grad():
        text = model.encode_text(class_texts.view(classes * templates, -1).to(device), normalize=True)
        clf = F.normalize(text.view(classes, templates, -1).mean(1), dim=-1)
        pred = (model.encode_image(images.to(device), normalize=True) @ clf.T).argmax(1).cpu()
    labels = torch.randint(classes, (n_images,), generator=g)
    labels[::2] = pred[::2]  # accuracy well above chance, so removals move the counts
    return ClassificationProxy(images, labels, class_texts)


def rank_correlation(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", choices=["classification", "retrieval", "both"], default="both")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--head-width", type=int, default=32)
    ap.add_argument("--neuron-groups", type=int, default=8)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--templates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--candidates-per-forward", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="also time the engine under bf16 autocast (GPU)")
    ap.add_argument("--rounds", type=int, nargs="*", default=[2, 3], help="iterative scoring to time")
    ap.add_argument("--skip-naive", action="store_true", help="only the engine and its rounds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = tiny_clip(args.layers, args.width, args.head_width).to(device)
    units = enumerate_units(model, neuron_groups=args.neuron_groups)
    kinds = ["classification", "retrieval"] if args.proxy == "both" else [args.proxy]
    print(
        f"model: {args.layers} layers x 2 towers, width {args.width}, {len(units)} candidates "
        f"(heads, {args.neuron_groups} neuron groups/layer, layers); {args.device}, {args.threads} thread(s)"
    )
    targets = {t: TowerTarget(layers=args.layers // 2, heads=0.5, mlp=0.5) for t in ("vision", "text")}
    kw = dict(batch_size=args.batch_size, candidates_per_forward=args.candidates_per_forward, progress=False)
    for kind in kinds:
        proxy = make_proxy(kind, model, args.images, args.classes, args.templates)
        t0, c0 = time.perf_counter(), time.process_time()
        got = score_mope(model, units, proxy, device, autocast=False, **kw)
        t_engine, c_engine = time.perf_counter() - t0, time.process_time() - c0
        line = f"{kind:>14}: engine {t_engine:6.2f}s ({len(units) / t_engine:6.1f} cand/s)"
        if not args.skip_naive:
            t0, c0 = time.perf_counter(), time.process_time()
            ref = score_mope_naive(model, units, proxy, device, batch_size=args.batch_size, logp=False)
            t_naive, c_naive = time.perf_counter() - t0, time.process_time() - c0
            differ = sum(a != b for a, b in zip(got.counts, ref.counts, strict=True))
            differ += got.base_counts != ref.base_counts
            line += (
                f" | naive {t_naive:7.2f}s ({len(units) / t_naive:6.1f} cand/s) | "
                f"speed-up {t_naive / t_engine:5.1f}x (CPU time {c_naive / c_engine:4.1f}x) | "
                f"units whose counts differ: {differ} (base Z {got.base_z:.3f})"
            )
            assert differ == 0, "engine and naive reference disagree"
        print(line, flush=True)
        for rounds in args.rounds:
            t0, c0 = time.perf_counter(), time.process_time()
            score = partial(score_mope, proxy=proxy, device=device, autocast=False, **kw)
            result = score_in_rounds(model, units, score, targets, "uniform", rounds)
            t_rounds, c_rounds = time.perf_counter() - t0, time.process_time() - c0
            print(
                f"{'':>14}  {rounds} rounds: {t_rounds:6.2f}s = {t_rounds / t_engine:4.2f}x one round "
                f"(CPU time {c_rounds / c_engine:4.2f}x); units scored per round {result.meta['round_units']}",
                flush=True,
            )
        if args.bf16:
            t0 = time.perf_counter()
            fast = score_mope(model, units, proxy, device, autocast=True, **kw)
            t_bf16 = time.perf_counter() - t0
            same = sum(a == b for a, b in zip(fast.counts, got.counts, strict=True))
            print(
                f"{'':>14}  engine bf16 {t_bf16:6.2f}s ({len(units) / t_bf16:6.1f} cand/s) | speed-up vs fp32 "
                f"{t_engine / t_bf16:5.1f}x | counts equal to fp32 for {same}/{len(units)} units, "
                f"score rank correlation {rank_correlation(fast.scores, got.scores):.3f}"
            )


if __name__ == "__main__":
    main()
