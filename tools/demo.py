"""The built-in demo, end to end on CPU (`make demo`):

1. synthetic image-text shards + a labelled zero-shot set (tools/make_synthetic.py);
2. a tiny teacher CLIP trained from scratch with the project's trainer (launch/train_clip.sh);
3. MoPE compression with launch/pretrain.sh configs/demo.yaml (score, prune, distill, export);
4. the same job with magnitude scores, same size, same distillation: the baseline;
5. the MoPE run's last checkpoint converted with tools/convert_checkpoint.py;
6. every model evaluated with tools/eval_zeroshot.py, and one table (params, GFLOPs, images/s,
   zero-shot top-1) printed and written to ROOT/report.md, with ROOT/accuracy_vs_params.png.

Each step is skipped when its output exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mope_dist.model import count_flops, count_params, load_model
from mope_dist.utils import atomic_write_bytes, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict, log_path: Path) -> None:
    """Run one step, its output teed to a log file; a failing step stops the demo with its log's tail."""
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"step failed ({proc.returncode}): {' '.join(cmd)}\n{tail}\nfull log: {log_path}")
    print(f"  done in {time.perf_counter() - start:.0f}s (log: {log_path})", flush=True)


def images_per_second(model, batch: int = 64, seconds: float = 1.0, rounds: int = 3) -> float:
    """Single-process encode_image throughput on random images of the model's size (best of `rounds`)."""
    model.eval()
    images = torch.randn(batch, 3, *model.spec.vision.image_size)
    best = 0.0
    with torch.inference_mode():
        model.encode_image(images)  # warm-up
        for _ in range(rounds):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model.encode_image(images)
                n += batch
            best = max(best, n / (time.perf_counter() - start))
    return best


def evaluate(model_dir: Path, data: Path, out: Path, env: dict) -> dict:
    if not out.exists():
        cmd = [sys.executable, "tools/eval_zeroshot.py", "--model", str(model_dir), "--data", str(data)]
        run([*cmd, "--output", str(out)], env, out.with_suffix(".log"))
    return json.loads(out.read_text())


def write_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row["params"] / 1e6, 100 * row["top1"], s=40)
        ax.annotate(
            row["name"],
            (row["params"] / 1e6, 100 * row["top1"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("demo: accuracy vs parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/demo", help="where data, runs and the report go")
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--teacher-steps", type=int, default=None, help="override configs/demo_teacher.yaml")
    ap.add_argument("--distill-steps", type=int, default=None, help="override configs/demo.yaml")
    ap.add_argument("--nproc", type=int, default=2, help="processes per launcher")
    ap.add_argument("--master-port", type=int, default=29530)
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for both jobs")
    args = ap.parse_args(argv)

    root = Path(args.root)
    data = root / "data"
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        NPROC_PER_NODE=str(args.nproc),
        MASTER_PORT=str(args.master_port),
        PYTHON=sys.executable,
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    paths = [f"data.train_shards={data}/train/{{000000..{max(0, args.train_samples // 1000 - 1):06d}}}.tar"]
    for section in ("eval", "mope.proxy"):
        paths += [
            f"{section}.data={data}/val",
            f"{section}.classnames={data}/val/classnames.txt",
            f"{section}.templates={data}/val/templates.txt",
        ]
    common = paths[:1] + [p for p in paths if p.startswith("eval.")] + args.overrides

    if not (data / "train").exists():
        run(
            [
                sys.executable,
                "tools/make_synthetic.py",
                str(data),
                "--train-samples",
                str(args.train_samples),
                "--samples-per-shard",
                "1000",
            ],
            env,
            root / "logs" / "data.log",
        )

    teacher_dir = root / "teacher" / "final"
    if not teacher_dir.exists():
        steps = [] if args.teacher_steps is None else [f"distill.steps={args.teacher_steps}"]
        run(
            [
                "bash",
                "launch/train_clip.sh",
                "configs/demo_teacher.yaml",
                f"output.dir={root}/teacher",
                *common,
                *steps,
            ],
            env,
            root / "logs" / "teacher.log",
        )

    steps = [] if args.distill_steps is None else [f"distill.steps={args.distill_steps}"]
    job = [
        "bash",
        "launch/pretrain.sh",
        "configs/demo.yaml",
        f"teacher.name={teacher_dir}",
        *paths,
        *args.overrides,
        *steps,
    ]
    for method in ("mope", "magnitude"):
        if not (root / method / "final").exists():
            run(
                [*job, f"mope.method={method}", f"output.dir={root}/{method}"],
                env,
                root / "logs" / f"{method}.log",
            )

    converted = root / "mope" / "converted"
    if not converted.exists():
        run(
            [sys.executable, "tools/convert_checkpoint.py", str(root / "mope"), str(converted)],
            env,
            root / "logs" / "convert.log",
        )

    models = [
        ("teacher", teacher_dir),
        ("MoPE pruned, before distillation", root / "mope" / "pruned"),
        ("MoPE pruned + distilled", converted),
        ("magnitude pruned, before distillation", root / "magnitude" / "pruned"),
        ("magnitude pruned + distilled", root / "magnitude" / "final"),
    ]
    rows = []
    for i, (name, model_dir) in enumerate(models):
        result = evaluate(model_dir, data / "val", root / "eval" / f"{i}.json", env)
        model = load_model(model_dir)
        rows.append(
            dict(
                name=name,
                params=count_params(model)["total"],
                gflops=count_flops(model)["image"] / 1e9,
                images_s=images_per_second(model),
                top1=result["top1"],
                n=result["n"],
            )
        )

    lines = [
        "| model | params (M) | GFLOPs / image | images/s (1 proc) | zero-shot top-1 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['gflops']:.4f} | {r['images_s']:.0f} | "
        f"{100 * r['top1']:.1f}% |"
        for r in rows
    ]
    chance = 1 / len((data / "val" / "classnames.txt").read_text().splitlines())
    report = "\n".join(
        [
            "# mope-dist demo",
            "",
            *lines,
            "",
            f"Zero-shot on {rows[0]['n']} synthetic images; chance is {100 * chance:.1f}%.",
            "",
        ]
    )
    atomic_write_text(root / "report.md", report)
    write_chart(rows, root / "accuracy_vs_params.png")
    print("\n" + report)
    print(f"report: {root / 'report.md'}, chart: {root / 'accuracy_vs_params.png'}")


if __name__ == "__main__":
    main()
