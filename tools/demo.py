"""The built-in demo, end to end on CPU (`make demo`):

1. synthetic image-text shards, a labelled zero-shot evaluation set and a separate MoPE proxy set
   (tools/make_synthetic.py);
2. a tiny teacher CLIP trained from scratch with the project's trainer (launch/train_clip.sh);
3. the teacher compressed to one size by every pruning criterion (MoPE one-shot and iterative,
   magnitude, Taylor, random) over several seeds, each run `launch/pretrain.sh configs/demo.yaml`
   (score, prune, distill, export), evaluated before and after the same distillation
   (tools/compare_methods.py);
4. the first MoPE run's last checkpoint converted with tools/convert_checkpoint.py and evaluated
   with tools/eval_zeroshot.py;
5. one report, ROOT/report.md: sizes (params, GFLOPs, images/s) and the comparison (mean +- std
   over seeds), with its chart ROOT/compare/compare.png.

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
from mope_dist.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
EVAL_FILES = (("data", ""), ("classnames", "/classnames.txt"), ("templates", "/templates.txt"))


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


def launcher_env(nproc: int, master_port: int) -> dict:
    """Environment for the launchers: CPU, offline, this interpreter, `nproc` processes."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        NPROC_PER_NODE=str(nproc),
        MASTER_PORT=str(master_port),
        PYTHON=sys.executable,
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    return env


def main(argv: list[str] | None = None) -> None:
    import compare_methods  # tools/compare_methods.py (which imports `run` from here)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/demo", help="where data, runs and the report go")
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--teacher-steps", type=int, default=None, help="override configs/demo_teacher.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the comparison")
    ap.add_argument(
        "--distill-steps", type=int, default=40, help="distillation steps of every compressed run"
    )
    ap.add_argument("--rounds", type=int, default=3, help="scoring rounds of iterative MoPE")
    ap.add_argument("--nproc", type=int, default=2, help="processes per launcher")
    ap.add_argument("--master-port", type=int, default=29530)
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every job")
    args = ap.parse_args(argv)

    root = Path(args.root)
    data = root / "data"
    env = launcher_env(args.nproc, args.master_port)
    if not (data / "proxy").exists():  # also rewrites data of an older layout (no proxy split)
        cmd = [sys.executable, "tools/make_synthetic.py", str(data), "--overwrite"]
        run([*cmd, "--train-samples", str(args.train_samples)], env, root / "logs" / "data.log")
    shards = f"data.train_shards={data}/train/{{000000..{max(0, args.train_samples // 1000 - 1):06d}}}.tar"
    evaluation = [f"eval.{k}={data}/val{v}" for k, v in EVAL_FILES]

    teacher_dir = root / "teacher" / "final"
    if not teacher_dir.exists():
        steps = [] if args.teacher_steps is None else [f"distill.steps={args.teacher_steps}"]
        cmd = ["bash", "launch/train_clip.sh", "configs/demo_teacher.yaml", f"output.dir={root}/teacher"]
        run([*cmd, shards, *evaluation, *args.overrides, *steps], env, root / "logs" / "teacher.log")

    compare_args = compare_methods.parse_args(
        [
            f"--teacher={teacher_dir}",
            f"--data={data}",
            f"--out={root}/compare",
            f"--seeds={args.seeds}",
            f"--steps={args.distill_steps}",
            f"--rounds={args.rounds}",
            f"--nproc={args.nproc}",
            f"--master-port={args.master_port}",
            "--",
            *args.overrides,
        ]
    )
    summary = compare_methods.compare(compare_args, env)

    first_mope = compare_methods.run_dir(compare_args, "mope", 0)
    converted = root / "converted"
    if not converted.exists():
        cmd = [sys.executable, "tools/convert_checkpoint.py", str(first_mope), str(converted)]
        run(cmd, env, root / "logs" / "convert.log")

    models = [("teacher", teacher_dir), ("MoPE student, converted from its last checkpoint", converted)]
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
            "## Pruning criteria at this size",
            "",
            compare_methods.markdown(summary),
        ]
    )
    atomic_write_text(root / "report.md", report)
    print("\n" + report)
    print(f"report: {root / 'report.md'}, chart: {root / 'compare' / 'compare.png'}")


if __name__ == "__main__":
    main()
