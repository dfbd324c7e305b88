"""Pre-training-stage compression in one job: MoPE scores -> one-shot width+depth pruning -> distillation.

    bash launch/pretrain.sh CONFIG.yaml [section.key=value ...]

Each phase is skipped when its output already exists in output.dir, and distillation resumes from
the latest complete checkpoint, so rerunning the same command after a preemption continues the run.
"""

from __future__ import annotations

import sys

from torch.utils.tensorboard import SummaryWriter

from mope_dist import dist
from mope_dist.config import config_from_argv
from mope_dist.model import load_model, load_teacher
from mope_dist.recipes.builders import train_loader, zeroshot_evaluator
from mope_dist.recipes.phases import check_targets, prune_phase, score_units
from mope_dist.recipes.run_dir import prepare_run_dir
from mope_dist.recipes.training import train_and_export
from mope_dist.utils import get_logger

log = get_logger("mope_dist.recipes.pretrain")


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    info = dist.init_distributed(cfg.dist_timeout_s, use_deepspeed=True)
    out = prepare_run_dir(cfg)
    teacher, preprocess_train, preprocess_val, tokenizer = load_teacher(
        cfg.teacher.name, cfg.teacher.pretrained
    )
    # Everything that can fail on bad input is built before the first expensive phase.
    check_targets(cfg, teacher.spec)
    data = train_loader(cfg, preprocess_train, tokenizer, info.world_size)
    evaluate = zeroshot_evaluator(cfg.eval, preprocess_val, tokenizer, info.device) if cfg.eval.data else None

    scores_path = out / "scores" / "scores.json"
    # decided once for every rank: a rank that looked later could see the file another rank has just
    # written, skip the phase (and its collectives) the others are in, and desynchronise the job
    have_scores, have_pruned = dist.broadcast_object((scores_path.exists(), (out / "pruned").exists()))
    if have_scores:
        log.info("scores: reusing %s", scores_path)
    else:
        tb = SummaryWriter(out / "tensorboard") if info.is_main else None
        score_units(cfg, teacher, preprocess_val, tokenizer, info.device, scores_path.parent, tb_writer=tb)
        if tb is not None:
            tb.close()

    if have_pruned:
        log.info("prune: reusing %s", out / "pruned")
    else:
        prune_phase(cfg, teacher, scores_path, out)
    student = load_model(out / "pruned")

    provenance = {"teacher": cfg.teacher.name, "pretrained": cfg.teacher.pretrained}
    train_and_export(student, teacher, data, cfg, out, info, evaluate=evaluate, provenance=provenance)
    if info.is_main:
        print(
            f"done: scores {scores_path}, plan {out / 'plan.json'}, pruned student {out / 'pruned'}, "
            f"checkpoints {out / 'checkpoints'}, logs {out / 'metrics.jsonl'} and {out / 'tensorboard'}, "
            f"final student {out / 'final'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
