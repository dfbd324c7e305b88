"""Stage-order ablation of fine-tuning-stage compression: width first, depth first and one-shot, at the
same final size, with launch/finetune.sh and one recipe; prints retrieval recall after every stage.

    python tools/finetune_ablation.py [--config configs/demo_finetune.yaml] [--out runs/demo/finetune_ablation]
        [--steps N] [--teacher-steps N] [--nproc 2] [section.key=value ...]

Width first runs first and fine-tunes the task teacher (finetune.teacher_steps); depth first and
one-shot distill from that same teacher. All orders apply the recipe's prune targets, so they end at
the same size (layer for layer with prune.allocation=uniform), and one-shot gets as many distillation
steps as the two-stage orders in total. A finished order is not rerun; an interrupted one resumes.
Writes OUT/ablation.md and OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from demo import run  # tools/demo.py: one step, its output teed to a log; a failure shows the log's tail

from mope_dist.utils import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ORDERS = {"width_first": ["width", "depth"], "depth_first": ["depth", "width"], "one_shot": ["width+depth"]}


def finetune_run(config: str, run_dir: Path, overrides: list[str], env: dict, log: Path) -> dict:
    """One order through launch/finetune.sh (unless its summary exists); its summary.json."""
    if not (run_dir / "summary.json").exists():
        run(["bash", "launch/finetune.sh", config, *overrides, f"output.dir={run_dir}"], env, log)
    return json.loads((run_dir / "summary.json").read_text())


def recall_cell(row: dict) -> str:
    return f"{100 * row['i2t_R@1']:.1f} / {100 * row['t2i_R@1']:.1f} / {100 * row['mean_recall']:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo_finetune.yaml")
    ap.add_argument("--out", default="runs/demo/finetune_ablation")
    ap.add_argument("--steps", type=int, help="distillation steps per stage (default: the recipe's)")
    ap.add_argument(
        "--teacher-steps", type=int, help="task-teacher fine-tuning steps (default: the recipe's)"
    )
    ap.add_argument("--nproc", type=int, help="processes (default: launch/common.sh's choice)")
    ap.add_argument("--master-port", type=int, default=29540)
    ap.add_argument("overrides", nargs="*", help="section.key=value for every order")
    args = ap.parse_args(argv)

    out = Path(args.out)
    env = dict(os.environ, MASTER_PORT=str(args.master_port), PYTHON=sys.executable)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    if args.nproc:
        env["NPROC_PER_NODE"] = str(args.nproc)
    common = [*args.overrides] + ([f"distill.steps={args.steps}"] if args.steps else [])

    def stages(name: str) -> str:
        return f"finetune.stages=[{','.join(ORDERS[name])}]"

    # 1. Width first, fine-tuning the task teacher when the recipe asks for it.
    first = out / "width_first"
    teacher = [] if args.teacher_steps is None else [f"finetune.teacher_steps={args.teacher_steps}"]
    summaries = {
        "width_first": finetune_run(
            args.config,
            first,
            [*common, *teacher, stages("width_first")],
            env,
            out / "logs" / "width_first.log",
        )
    }
    resolved = yaml.safe_load((first / "config.yaml").read_text())

    # 2. The other orders, distilling from that same teacher; one-shot gets both stages' steps.
    if resolved["finetune"]["teacher_steps"]:
        common += [f"teacher.name={first / 'teacher' / 'final'}", "finetune.teacher_steps=0"]
    for name in ("depth_first", "one_shot"):
        steps = resolved["distill"]["steps"] * (2 if name == "one_shot" else 1)
        overrides = [*common, stages(name), f"distill.steps={steps}"]
        summaries[name] = finetune_run(args.config, out / name, overrides, env, out / "logs" / f"{name}.log")

    # 3. One table: recall after each stage, final size, distillation steps in all.
    task_teacher = [r for r in summaries["width_first"]["rows"] if not r["model"].startswith("stage")][-1]
    lines = [
        "| order | after stage 1 | after stage 2 | params (M) | distillation steps |",
        "|---|---|---|---|---|",
        f"| {task_teacher['model']} | {recall_cell(task_teacher)} | | {task_teacher['params']['total'] / 1e6:.2f} | |",
    ]
    sizes = set()
    for name, summary in summaries.items():
        rows = [r for r in summary["rows"] if r["model"].endswith(": distilled")]
        cells = [f"{r['model'].removesuffix(': distilled')}: {recall_cell(r)}" for r in rows]
        cells += [""] * (2 - len(cells))
        steps = sum(
            json.loads((Path(r["path"]) / "config.json").read_text())["provenance"]["steps"] for r in rows
        )
        sizes.add(rows[-1]["params"]["total"])
        lines.append(f"| {name} | {' | '.join(cells)} | {rows[-1]['params']['total'] / 1e6:.2f} | {steps} |")
    size_note = (
        "every order ends at the same size" if len(sizes) == 1 else f"final sizes differ: {sorted(sizes)}"
    )
    report = "\n".join(
        [
            "# Fine-tuning-stage compression: stage-order ablation",
            "",
            "Retrieval recall (%) of the distilled student after each stage: i2t R@1 / t2i R@1 / mean of",
            f"R@1,5,10 both ways, on the held-out pairs {resolved['finetune']['eval_data']}; {size_note}.",
            "",
            *lines,
            "",
        ]
    )
    atomic_write_text(out / "ablation.md", report)
    atomic_write_json(out / "ablation.json", summaries)
    print("\n" + report)


if __name__ == "__main__":
    main()
