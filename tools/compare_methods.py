"""Pruning criteria side by side at one size: MoPE (one shot, and iterative with mope.rounds > 1),
weight magnitude, Taylor and random scores prune the same teacher to the same targets (the
recipe's) and are distilled alike, over several seeds. Zero-shot top-1 on the evaluation set, which
shares no image with the proxy set that chose what to prune, before and after distillation, as mean
+- std over seeds.

    python tools/compare_methods.py [--teacher runs/demo/teacher/final] [--data runs/demo/data]
        [--out runs/demo/compare] [--seeds 3] [--steps 40] [--rounds 3] [--proxy-per-class 10]
        [--methods mope mope-iterative magnitude taylor random] [--nproc 2] [section.key=value ...]

A seed changes the proxy images (drawn anew from the synthetic generator, never the evaluation
images; seed 0 is DATA/proxy when it has --proxy-per-class images a class), the random baseline's
scores and the distillation data order. Every run is `bash launch/pretrain.sh CONFIG` (score, prune,
distill, export) into OUT/runs/<method>_s<seed>; finished runs are reused, so an interrupted
comparison continues, and more seeds can be added later. Writes OUT/compare.md, OUT/compare.json
and OUT/compare.png.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

import torch
from demo import EVAL_FILES, launcher_env, run  # tools/demo.py: run = one step teed to a log

from mope_dist.data import load_classnames, load_templates, make_labelled_loader
from mope_dist.data.synthetic import SPLIT_SEEDS, write_labelled_set
from mope_dist.eval import build_classifier, evaluate_zeroshot
from mope_dist.model import count_flops, count_params, create_model_and_transforms, get_tokenizer
from mope_dist.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

METHODS = ("mope", "mope-iterative", "magnitude", "taylor", "random")


def method_overrides(method: str, rounds: int) -> list[str]:
    if method == "mope-iterative":
        return ["mope.method=mope", f"mope.rounds={rounds}"]
    return [f"mope.method={method}"]


def run_dir(args: argparse.Namespace, method: str, seed: int) -> Path:
    """One run's directory, named by everything that makes it differ from another."""
    name = method + (f"-r{args.rounds}" if method == "mope-iterative" else "")
    return Path(args.out) / "runs" / f"{name}_proxy{args.proxy_per_class}_steps{args.steps}_seed{seed}"


def proxy_set(data: Path, out: Path, seed: int, per_class: int) -> Path:
    """Seed 0: the data's own proxy split (if it has per_class images a class); other seeds: a fresh
    draw of per_class images a class from seeds no other split uses."""
    own = data / "proxy"
    if seed == 0 and own.is_dir() and len(list(next(own.glob("000_*")).iterdir())) == per_class:
        return own
    path = out / "proxies" / f"seed{seed}_{per_class}"
    if not path.exists():
        write_labelled_set(path, per_class, seed=1000 * (seed + 1) + SPLIT_SEEDS["proxy"])
    return path


def zero_shot_top1(model_dir: Path, data: Path, cache: Path) -> float:
    """Top-1 of a standalone model dir on an ImageFolder set (in this process; cached in `cache`)."""
    if cache.exists():
        return json.loads(cache.read_text())["top1"]
    model, _, preprocess = create_model_and_transforms(str(model_dir))
    classnames = load_classnames(data / "classnames.txt")
    loader = make_labelled_loader(str(data), preprocess, 256, num_workers=0, classnames=classnames)
    device = torch.device("cpu")
    classifier = build_classifier(
        model, classnames, load_templates(data / "templates.txt"), get_tokenizer(str(model_dir)), device
    )
    result = evaluate_zeroshot(model, loader, classifier, device, progress=False)
    atomic_write_json(cache, {"model": str(model_dir), "data": str(data), **result})
    return result["top1"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_chart(rows: list[dict], teacher_top1: float, path: Path) -> None:
    """Grouped bars: mean top-1 before / after distillation per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    for offset, key, label in ((-0.2, "before", "pruned"), (0.2, "after", "pruned + distilled")):
        means = [100 * r[key][0] for r in rows]
        stds = [100 * r[key][1] for r in rows]
        ax.bar([x + offset for x in xs], means, 0.4, yerr=stds, capsize=3, label=label)
    ax.axhline(100 * teacher_top1, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["method"] for r in rows])
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(f"same size, mean +- std over {rows[0]['seeds']} seeds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)


def compare(args: argparse.Namespace, env: dict) -> dict:
    """Run (or reuse) every method x seed, evaluate, write the table, JSON and chart; return the summary."""
    out, data, teacher = Path(args.out), Path(args.data), Path(args.teacher)
    shards = sorted((data / "train").glob("*.tar"))
    common = [
        f"teacher.name={teacher}",
        f"data.train_shards={data}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar",
        *[f"eval.{k}={data}/val{v}" for k, v in EVAL_FILES],
        f"distill.steps={args.steps}",
        "distill.eval_every=0",
        f"distill.ckpt_every={args.steps}",
        *args.overrides,
    ]
    runs = {}
    for seed in range(args.seeds):
        proxy = proxy_set(data, out, seed, args.proxy_per_class)
        for method in args.methods:
            directory = run_dir(args, method, seed)
            if not (directory / "final").exists():
                cmd = [
                    "bash",
                    "launch/pretrain.sh",
                    args.config,
                    *common,
                    *method_overrides(method, args.rounds),
                    f"mope.seed={seed}",
                    f"data.seed={seed}",
                    f"mope.proxy.data={proxy}",
                    f"mope.proxy.classnames={proxy}/classnames.txt",
                    f"mope.proxy.templates={proxy}/templates.txt",
                    f"output.dir={directory}",
                ]
                run(cmd, env, out / "logs" / f"{directory.name}.log")
            runs[(method, seed)] = {
                "before": zero_shot_top1(directory / "pruned", data / "val", directory / "eval_pruned.json"),
                "after": zero_shot_top1(directory / "final", data / "val", directory / "eval_final.json"),
            }
    teacher_top1 = zero_shot_top1(teacher, data / "val", out / "eval_teacher.json")
    rows = []
    for method in args.methods:
        before = [runs[(method, s)]["before"] for s in range(args.seeds)]
        after = [runs[(method, s)]["after"] for s in range(args.seeds)]
        rows.append(
            {
                "method": method,
                "seeds": args.seeds,
                "before": mean_std(before),
                "after": mean_std(after),
                "per_seed": {"before": before, "after": after},
            }
        )
    student = create_model_and_transforms(str(run_dir(args, args.methods[0], 0) / "pruned"))[0]
    teacher_model = create_model_and_transforms(str(teacher))[0]
    sizes = {
        name: {"params": count_params(m)["total"], "gflops_image": count_flops(m)["image"] / 1e9}
        for name, m in (("teacher", teacher_model), ("student", student))
    }
    summary = {
        "teacher_top1": teacher_top1,
        "steps": args.steps,
        "rounds": args.rounds,
        "proxy_per_class": args.proxy_per_class,
        "eval_images": len(list((data / "val").glob("*/*.jpg"))),
        "sizes": sizes,
        "rows": rows,
    }
    table = markdown(summary)
    atomic_write_text(out / "compare.md", table)
    atomic_write_json(out / "compare.json", summary)
    write_chart(rows, teacher_top1, out / "compare.png")
    print("\n" + table, flush=True)
    return summary


def markdown(summary: dict) -> str:
    sizes, rows = summary["sizes"], summary["rows"]
    lines = [
        f"Zero-shot top-1 (%) on {summary['eval_images']} evaluation images (none of them in the proxy "
        f"sets, {summary['proxy_per_class']} images a class), mean +- std over {rows[0]['seeds']} seeds; "
        f"teacher {100 * summary['teacher_top1']:.1f}% ({sizes['teacher']['params'] / 1e6:.2f}M params, "
        f"{sizes['teacher']['gflops_image']:.4f} GFLOPs/image), every student "
        f"{sizes['student']['params'] / 1e6:.2f}M params, {sizes['student']['gflops_image']:.4f} GFLOPs/image.",
        "",
        f"| method | pruned, before distillation | after {summary['steps']} distillation steps |",
        "|---|---|---|",
    ]
    for r in rows:
        name = r["method"] + (f" ({summary['rounds']} rounds)" if r["method"] == "mope-iterative" else "")
        cells = [f"{100 * r[k][0]:.1f} +- {100 * r[k][1]:.1f}" for k in ("before", "after")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/demo/teacher/final")
    ap.add_argument("--data", default="runs/demo/data", help="tools/make_synthetic.py's output")
    ap.add_argument("--out", default="runs/demo/compare")
    ap.add_argument("--config", default="configs/demo.yaml", help="recipe: targets, distillation settings")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="distillation steps of every run")
    ap.add_argument("--rounds", type=int, default=3, help="scoring rounds of mope-iterative")
    ap.add_argument("--proxy-per-class", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=2, help="processes per run")
    ap.add_argument("--master-port", type=int, default=29550)
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.rounds < 2:
        ap.error("--seeds and --steps must be >= 1, --rounds >= 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return compare(args, launcher_env(args.nproc, args.master_port))


if __name__ == "__main__":
    main()
