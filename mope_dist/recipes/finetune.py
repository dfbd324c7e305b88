"""Fine-tuning-stage compression of a task-specific (retrieval) CLIP: width first, then depth, or any
stage order the config lists.

    bash launch/finetune.sh CONFIG.yaml [section.key=value ...]

1. Task teacher: with finetune.teacher_steps > 0 the full model is first fine-tuned with the
   contrastive loss on data.train_shards (OUT/teacher/); otherwise teacher.name is that teacher.
2. Stages, in the order of finetune.stages: "width" (prune.*.heads / mlp targets), "depth"
   (prune.*.layers) or "width+depth" (all at once). Each scores the units it removes on the previous
   stage's distilled student with mope.method (mope.proxy.kind=retrieval: recall on held-out pairs),
   prunes them and distills from the task teacher (hidden states map through source_layers, which
   compose over the stages). OUT/stage_<i>_<name>/: stage.json, scores/, plan.json, pruned/,
   checkpoints/, metrics.jsonl, final/. A stage scores exactly the towers and unit kinds it prunes
   (mope.towers and mope.kinds are not used); a tower without targets is left as it is.
3. Retrieval R@1/5/10 (both directions) on finetune.eval_data of the teacher and of every stage's
   student before and after distillation: OUT/summary.json and OUT/summary.md.

A stage whose final/ exists is done and is not redone; an interrupted stage reuses its scores and
pruned/ and resumes distillation from its latest checkpoint. So rerunning the command continues the
job, and appending a stage to the list later builds on the stages already done.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mope_dist import dist
from mope_dist.config import Config, TowerTarget, config_from_argv
from mope_dist.errors import ConfigError
from mope_dist.model import count_flops, count_params, load_model, load_teacher
from mope_dist.recipes.builders import TrainData, retrieval_evaluator, train_loader
from mope_dist.recipes.phases import check_targets, prune_phase, score_units
from mope_dist.recipes.run_dir import prepare_run_dir
from mope_dist.recipes.training import train_and_export
from mope_dist.utils import atomic_write_json, atomic_write_text, get_logger, is_local_path

log = get_logger("mope_dist.recipes.finetune")

TOWERS = ("vision", "text")
# Which prune.<tower> targets each stage applies, and the unit kind MoPE scores for each target.
STAGE_TARGETS = {"width": ("heads", "mlp"), "depth": ("layers",), "width+depth": ("heads", "mlp", "layers")}
UNIT_KIND = {"heads": "head", "mlp": "neurons", "layers": "layer"}
RECALLS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")


@dataclass
class Stage:
    index: int
    name: str
    dir: Path
    targets: dict[str, TowerTarget]  # this stage's share of prune.vision / prune.text
    towers: list[str]  # the towers it prunes
    kinds: list[str]  # the unit kinds it scores


def plan_stages(cfg: Config, out: Path) -> list[Stage]:
    """finetune.stages -> what each stage prunes. A target is applied by one stage only (a second
    would take its keep-ratio again), and a stage with nothing to prune is a config error."""
    stages, claimed = [], {}
    for i, name in enumerate(cfg.finetune.stages):
        keys = STAGE_TARGETS[name]
        for key in keys:
            if key in claimed:
                raise ConfigError(
                    f"finetune.stages[{i}]={name}: the prune.*.{key} targets are already applied by "
                    f"finetune.stages[{claimed[key]}]"
                )
            claimed[key] = i
        targets = {t: TowerTarget(**{k: getattr(getattr(cfg.prune, t), k) for k in keys}) for t in TOWERS}
        set_keys = [k for k in keys if any(getattr(targets[t], k) is not None for t in TOWERS)]
        if not set_keys:
            raise ConfigError(
                f"finetune.stages[{i}]={name}: no prune.vision or prune.text {'/'.join(keys)} target to apply"
            )
        towers = [t for t in TOWERS if any(getattr(targets[t], k) is not None for k in keys)]
        kinds = [UNIT_KIND[k] for k in set_keys]
        stages.append(Stage(i, name, out / f"stage_{i}_{name}", targets, towers, kinds))
    unused = [
        f"prune.{t}.{k}"
        for t in TOWERS
        for k in ("layers", "heads", "mlp")
        if k not in claimed and getattr(getattr(cfg.prune, t), k) is not None
    ]
    if unused:
        log.warning("no stage in finetune.stages applies %s", ", ".join(unused))
    return stages


def finished(run_dir: Path) -> bool:
    """Decided once for every rank (a late rank could see a final/ another rank has just written)."""
    return dist.broadcast_object((run_dir / "final").exists())


def check_stage_dir(stage: Stage, before: list[str]) -> None:
    """A stage dir holds the stage built on `before`; a dir left by another stage order is refused."""
    record = stage.dir / "stage.json"
    if record.exists():
        after = json.loads(record.read_text())["after"]
        if after != before:
            raise ConfigError(
                f"{stage.dir} holds a {stage.name} stage built after stages {after}, but finetune.stages now "
                f"puts it after {before}: use a new output.dir"
            )
    dist.barrier()  # every rank has read the record before rank 0 writes a new one
    if dist.is_main() and not record.exists():
        targets = {t: dataclasses.asdict(v) for t, v in stage.targets.items()}
        atomic_write_json(
            record, {"index": stage.index, "name": stage.name, "after": before, "targets": targets}
        )


def teacher_config(cfg: Config) -> Config:
    """The run's config for fine-tuning the teacher: the distill section with finetune.teacher_steps
    and teacher_lr (trained without a teacher, so with the contrastive loss only)."""
    lr = cfg.finetune.teacher_lr or cfg.distill.lr
    distill = dataclasses.replace(
        cfg.distill, steps=cfg.finetune.teacher_steps, lr=lr, min_lr=min(cfg.distill.min_lr, lr)
    )
    return dataclasses.replace(cfg, distill=distill)


def compress(
    cfg: Config, stage: Stage, source, teacher, data: TrainData, evaluate, info, preprocess, tokenizer
) -> None:
    """One stage: score the units it removes on `source`, prune, distill from `teacher`, export."""
    scores_path = stage.dir / "scores" / "scores.json"
    have_scores, have_pruned = dist.broadcast_object((scores_path.exists(), (stage.dir / "pruned").exists()))
    if have_pruned:
        log.info("stage %d (%s): reusing %s", stage.index, stage.name, stage.dir / "pruned")
    else:
        model = load_teacher(*source)[0]
        if have_scores:
            log.info("stage %d (%s): reusing %s", stage.index, stage.name, scores_path)
        else:
            log.info("stage %d (%s): scoring %s of %s", stage.index, stage.name, stage.kinds, stage.towers)
            score_units(
                cfg,
                model,
                preprocess,
                tokenizer,
                info.device,
                scores_path.parent,
                stage.kinds,
                stage.towers,
                targets=stage.targets,
            )
        provenance = {"task_teacher": teacher[0], "pruned_from": source[0], "stage": stage.name}
        prune_phase(cfg, model, scores_path, stage.dir, stage.targets, provenance, names=("before", "pruned"))
        del model

    log.info("stage %d (%s): distilling from %s", stage.index, stage.name, teacher[0])
    train_and_export(
        load_model(stage.dir / "pruned"),
        load_teacher(*teacher)[0],
        data,
        cfg,
        stage.dir,
        info,
        evaluate,
        provenance={"task_teacher": teacher[0], "stage": stage.name},
    )


def summarize(models: list[tuple[str, tuple]], evaluate, out: Path) -> list[dict]:
    """Size and retrieval recall of every model; rank 0 writes summary.json and summary.md."""
    rows = []
    for label, source in models:
        model = load_teacher(*source)[0]
        params, flops = count_params(model), count_flops(model)
        rows.append({"model": label, "path": source[0], "params": params, "flops": flops, **evaluate(model)})
        del model
    if dist.is_main():
        atomic_write_json(out / "summary.json", {"rows": rows})
        header = (
            "| model | vision params (M) | text params (M) | GFLOPs / image | " + " | ".join(RECALLS) + " |"
        )
        lines = [header, "|---" * (4 + len(RECALLS)) + "|"]
        for r in rows:
            p = r["params"]
            cells = [
                r["model"],
                f"{p['vision'] / 1e6:.2f}",
                f"{p['text'] / 1e6:.2f}",
                f"{r['flops']['image'] / 1e9:.4f}",
            ]
            lines.append("| " + " | ".join(cells + [f"{100 * r[k]:.1f}" for k in RECALLS]) + " |")
        table = "\n".join(lines)
        atomic_write_text(
            out / "summary.md", f"# Fine-tuning-stage compression: retrieval recall (%)\n\n{table}\n"
        )
        print(table, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    info = dist.init_distributed(cfg.dist_timeout_s, use_deepspeed=True)
    eval_data = cfg.finetune.eval_data
    if not eval_data:
        raise ConfigError("finetune.eval_data (held-out retrieval pairs) is required by the finetune job")
    # checked here, not in config validation, whose test of the shipped recipes redirects only the
    # older data keys to existing paths
    if is_local_path(eval_data) and not Path(eval_data).exists():
        raise ConfigError(f"finetune.eval_data: path {eval_data} does not exist")
    out = prepare_run_dir(cfg)
    base = (cfg.teacher.name, cfg.teacher.pretrained)
    model, preprocess_train, preprocess_val, tokenizer = load_teacher(*base)
    # Everything that can fail on bad input is checked before the first expensive phase. Each phase
    # then loads the model it works on and drops it, so trainings in one process do not pile up.
    check_targets(cfg, model.spec)
    del model
    stages = plan_stages(cfg, out)
    data = train_loader(cfg, preprocess_train, tokenizer, info.world_size)
    evaluate = retrieval_evaluator(
        cfg.finetune.eval_data, preprocess_val, tokenizer, info.device, cfg.finetune.eval_batch_size
    )

    # 1. The task teacher: the full model fine-tuned on the task's pairs, or teacher.name as given.
    teacher = base
    models = [("teacher", base)]
    if cfg.finetune.teacher_steps:
        teacher = (str(out / "teacher" / "final"), None)
        models = [("pre-trained model", base), ("task teacher (fine-tuned)", teacher)]
        if finished(out / "teacher"):
            log.info("teacher: reusing %s", teacher[0])
        else:
            provenance = {"fine_tuned_from": cfg.teacher.name, "pretrained": cfg.teacher.pretrained}
            run_cfg = teacher_config(cfg)
            train_and_export(
                load_teacher(*base)[0], None, data, run_cfg, out / "teacher", info, evaluate, provenance
            )

    # 2. The stages, each compressing the previous one's distilled student.
    source = teacher
    for stage in stages:
        check_stage_dir(stage, cfg.finetune.stages[: stage.index])
        if finished(stage.dir):
            log.info("stage %d (%s): done, reusing %s", stage.index, stage.name, stage.dir / "final")
        else:
            compress(cfg, stage, source, teacher, data, evaluate, info, preprocess_val, tokenizer)
        source = (str(stage.dir / "final"), None)
        label = f"stage {stage.index} {stage.name}"
        models += [(f"{label}: pruned", (str(stage.dir / "pruned"), None)), (f"{label}: distilled", source)]

    # 3. Retrieval recall of every model, one table.
    summarize(models, evaluate, out)
    if info.is_main:
        print(
            f"done: {len(stages)} stage(s), final student {source[0]}, summary {out / 'summary.md'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
