"""Wiring shared by the entry points (pretrain, finetune, the scoring CLI): config sections -> library calls.

Also the run directory rule: one per job, refusing to mix runs that would disagree on what they
produced. Layout: config.yaml (resolved), scores/, plan.json, pruned/, checkpoints/, tensorboard/,
final/, metrics.jsonl. The sections that decide scores, plan and pruned model (teacher, mope,
prune) must match an existing run's; training settings may change between restarts (more steps).
"""

from __future__ import annotations

import gc
import sys
from functools import partial
from pathlib import Path

import torch

from mope_dist import dist
from mope_dist.config import (
    Config,
    EvalConfig,
    ProxyConfig,
    TowerTarget,
    save_config,
    validate_targets,
)
from mope_dist.data import (
    load_classnames,
    load_retrieval_set,
    load_templates,
    make_image_text_loader,
    make_labelled_loader,
)
from mope_dist.distill.trainer import TrainArgs, TrainState, export_student, train
from mope_dist.errors import ConfigError
from mope_dist.eval.retrieval import evaluate_retrieval
from mope_dist.eval.zeroshot import build_classifier, evaluate_zeroshot
from mope_dist.model import format_counts_table, save_pretrained, slice_model
from mope_dist.mope.baselines import score_magnitude, score_random, score_taylor
from mope_dist.mope.engine import score_mope
from mope_dist.mope.proxies import ClassificationProxy, RetrievalProxy, class_text_tokens
from mope_dist.mope.report import ScoreResult, read_scores, write_scores
from mope_dist.mope.units import enumerate_units
from mope_dist.preflight import ARTIFACT_SECTIONS, run_dir_problem
from mope_dist.prune.plan import make_plan
from mope_dist.prune.rounds import score_in_rounds
from mope_dist.utils import atomic_write_json, get_logger

log = get_logger("mope_dist.jobs")


def prepare_run_dir(cfg: Config) -> Path:
    """Check `cfg.output.dir` against a previous run's config, then write the resolved config (rank 0)."""
    out = Path(cfg.output.dir)
    previous_path = out / "config.yaml"
    error = None
    if dist.is_main():
        try:
            problem = run_dir_problem(cfg)
            if problem:
                raise ConfigError(problem)
            if previous_path.exists() and not cfg.output.overwrite:
                import yaml

                previous = yaml.safe_load(previous_path.read_text()) or {}
                current = cfg.to_dict()
                others = [k for k in current if k not in ARTIFACT_SECTIONS and previous.get(k) != current[k]]
                if others:
                    log.warning("resuming %s with changed settings: %s", out, ", ".join(others))
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, previous_path)
        except (ConfigError, OSError) as e:
            error = (
                f"config error: {e}" if isinstance(e, ConfigError) else f"cannot write output.dir {out}: {e}"
            )
    error = dist.broadcast_object(error)
    if error:
        if dist.is_main():
            print(error, file=sys.stderr)
        raise SystemExit(2)
    return out


def check_targets(cfg: Config, spec) -> None:
    """Absolute prune targets must fit the model; checked before any scoring work."""
    towers = {"vision": spec.vision, "text": spec.text}
    validate_targets(
        cfg,
        layers={k: t.num_layers for k, t in towers.items()},
        heads={k: min(t.heads) for k, t in towers.items()},
        mlp={k: min(t.mlp_dims) for k, t in towers.items()},
    )


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Per-rank batch of one micro-step: the global batch split over ranks and accumulation steps."""
    parts = world_size * cfg.distill.grad_accum
    if cfg.data.batch_size % parts:
        raise SystemExit(
            f"config error: data.batch_size={cfg.data.batch_size} is not divisible by world size {world_size} "
            f"x distill.grad_accum {cfg.distill.grad_accum}"
        )
    return cfg.data.batch_size // parts


def train_loader(cfg: Config, preprocess, tokenizer, world_size: int):
    return make_image_text_loader(
        cfg.data.train_shards,
        preprocess,
        tokenizer,
        batch_size=micro_batch_size(cfg, world_size),
        num_workers=cfg.data.workers,
        mode=cfg.data.mode,
        seed=cfg.data.seed,
        samples_per_epoch=cfg.data.samples_per_epoch,
    )


def train_args(cfg: Config, world_size: int, distill: bool = True) -> TrainArgs:
    """TrainArgs from the distill and deepspeed sections; `distill=False` keeps only the contrastive term."""
    d, losses = cfg.distill, cfg.distill.losses
    return TrainArgs(
        total_steps=d.steps,
        micro_batch_size=micro_batch_size(cfg, world_size),
        lr=d.lr,
        min_lr=d.min_lr,
        warmup_steps=d.warmup_steps,
        weight_decay=d.weight_decay,
        betas=tuple(d.betas),
        eps=d.eps,
        grad_accum_steps=d.grad_accum,
        grad_clip=d.grad_clip,
        zero_stage=cfg.deepspeed.zero_stage,
        precision=cfg.deepspeed.precision,
        ds_config_extra=cfg.deepspeed.extra or None,
        grad_checkpointing=d.grad_checkpointing,
        contrastive_weight=losses.contrastive,
        kd_weight=losses.kd if distill else 0.0,
        embed_weight=losses.embed if distill else 0.0,
        hidden_weight=losses.hidden if distill else 0.0,
        temperature=losses.kd_temperature,
        local_loss=d.local_loss,
        gather_with_grad=d.gather_with_grad,
        log_every=d.log_every,
        eval_every=d.eval_every,
        save_every=d.ckpt_every,
        keep_checkpoints=d.keep_checkpoints,
        max_consecutive_skips=d.max_nonfinite_steps,
        max_skip_rate=cfg.data.max_skip_rate,
        mirror_url=cfg.output.sync_url,
    )


def build_proxy(section: ProxyConfig, preprocess, tokenizer) -> ClassificationProxy | RetrievalProxy:
    """The whole proxy set in memory on every rank (the scorer shards its batches over ranks).
    An unusable set (no images, class names that do not fit) is a ConfigError naming mope.proxy."""
    try:
        return _build_proxy(section, preprocess, tokenizer)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"mope.proxy ({section.data}): {e}") from e


def _build_proxy(section: ProxyConfig, preprocess, tokenizer) -> ClassificationProxy | RetrievalProxy:
    if section.kind == "retrieval":
        images, texts, text_to_image = load_retrieval_set(section.data, preprocess, tokenizer)
        return RetrievalProxy(images, texts, text_to_image)
    classnames = load_classnames(section.classnames)
    loader = make_labelled_loader(
        section.data,
        preprocess,
        section.batch_size,
        rank=0,
        world_size=1,
        max_per_class=section.max_per_class,
        classnames=classnames,
    )
    images, labels = zip(*loader, strict=True)
    class_texts = class_text_tokens(classnames, load_templates(section.templates), tokenizer)
    return ClassificationProxy(torch.cat(images), torch.cat(labels), class_texts)


def score_units(
    cfg: Config,
    model,
    preprocess,
    tokenizer,
    device,
    out_dir: Path,
    kinds=None,
    towers=None,
    tb_writer=None,
    targets: dict[str, TowerTarget] | None = None,
) -> ScoreResult:
    """Score the units of `model` (`towers`/`kinds` default to cfg.mope's) with `cfg.mope.method`, in
    `cfg.mope.rounds` rounds towards `targets` (default cfg.prune's); rank 0 writes scores.json and heatmaps."""
    m = cfg.mope
    units = enumerate_units(model, towers or m.towers, kinds or m.kinds, m.neuron_groups)
    if m.method == "magnitude":
        score = score_magnitude
    elif m.method == "random":
        score = lambda _, us: score_random(us, seed=m.seed)  # noqa: E731
    else:
        proxy = build_proxy(m.proxy, preprocess, tokenizer)
        log.info("scoring %d units with %s on a %s proxy", len(units), m.method, m.proxy.kind)
        model = model.to(device)
        if m.method == "taylor":
            score = partial(score_taylor, proxy=proxy, device=device, batch_size=m.proxy.batch_size)
        else:
            score = partial(
                score_mope,
                proxy=proxy,
                device=device,
                batch_size=m.proxy.batch_size,
                candidates_per_forward=m.candidates_per_forward,
            )
    targets = targets or {"vision": cfg.prune.vision, "text": cfg.prune.text}
    result = score_in_rounds(model, units, score, targets, cfg.prune.allocation, m.rounds)
    if dist.is_main():
        write_scores(result, out_dir, tb_writer=tb_writer)
    dist.barrier()
    return result


def zeroshot_evaluator(section: EvalConfig, preprocess, tokenizer, device):
    """`evaluate(model) -> {top1, top5}` on this rank's part of the eval set; collective on every rank.
    An unusable set is a ConfigError naming eval.data, raised here (before training)."""
    try:
        classnames = load_classnames(section.classnames)
        templates = load_templates(section.templates)
        loader = make_labelled_loader(
            section.data,
            preprocess,
            section.batch_size,
            max_per_class=section.max_per_class,
            num_workers=section.workers,
            classnames=classnames,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"eval ({section.data}): {e}") from e

    def evaluate(model) -> dict:
        classifier = build_classifier(model, classnames, templates, tokenizer, device)
        result = evaluate_zeroshot(model, loader, classifier, device, progress=False)
        return {"top1": result["top1"], "top5": result["top5"]}

    return evaluate


def prune_phase(
    cfg: Config,
    model,
    scores_path: Path,
    out: Path,
    targets: dict[str, TowerTarget] | None = None,
    provenance: dict | None = None,
    names: tuple[str, str] = ("teacher", "pruned"),
) -> None:
    """plan.json + pruned/ from the scores of `model` (rank 0 writes; the others wait).

    `targets` per tower default to cfg.prune's; `provenance` is added to pruned/config.json's. A plan
    the scores cannot satisfy is a ConfigError on every rank (not rank 0 failing while the rest wait)."""
    error = None
    if dist.is_main():
        try:
            result = read_scores(scores_path)
            targets = targets or {"vision": cfg.prune.vision, "text": cfg.prune.text}
            keep = make_plan(model.spec, result.to_dict()["units"], targets, cfg.prune.allocation)
        except ConfigError as e:
            error = str(e)
        else:
            student = slice_model(model, keep)
            plan = {"method": result.method, "allocation": cfg.prune.allocation, "keep": keep.to_dict()}
            atomic_write_json(out / "plan.json", plan)
            provenance = {
                "teacher": cfg.teacher.name,
                "pretrained": cfg.teacher.pretrained,
                **(provenance or {}),
                "plan": plan,
            }
            save_pretrained(student, out / "pruned", provenance=provenance)
            print(format_counts_table(model, student, names=names), flush=True)
    agreed = dist.agree_on_error(error)  # collective: also the barrier the other ranks wait at
    if agreed:
        raise ConfigError(agreed[0])


def retrieval_evaluator(shards: str, preprocess, tokenizer, device, batch_size: int):
    """`evaluate(model) -> {i2t_R@k, t2i_R@k, mean_recall}` on a retrieval set loaded once; collective."""
    data = load_retrieval_set(shards, preprocess, tokenizer)

    def evaluate(model) -> dict:
        result = evaluate_retrieval(model, *data, device, batch_size=batch_size)
        return {k: v for k, v in result.items() if "R@" in k or k == "mean_recall"}

    return evaluate


def release_engine(engine) -> None:
    """Undo what a finished DeepSpeed engine leaves behind in the process (collect garbage afterwards).

    `engine.destroy()` removes ZeRO's hooks and buffers, but ZeRO-3 also keeps the module, and through
    its hooks the engine and the optimizer state, in two process-wide places: the forward-module stack
    and an lru_cache on a parameter-coordinator method (DeepSpeed 0.19)."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    module = engine.module
    engine.destroy()
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    for fn in vars(partitioned_param_coordinator.PartitionedParameterCoordinator).values():
        for cell in getattr(fn, "__closure__", None) or ():  # the cache sits under an NVTX wrapper
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()


def train_and_export(
    student, teacher, loader, args: TrainArgs, out: Path, info, evaluate=None, provenance: dict | None = None
) -> TrainState:
    """train() into `out`, export out/final, then free the engine, so that several trainings can run
    one after another in one process (pass models nobody else holds, or they stay alive)."""
    result = train(student, teacher, loader, args, out, info, evaluate=evaluate)
    export_student(
        result.engine, out / "final", provenance={**(provenance or {}), "steps": result.state.step}
    )
    release_engine(result.engine)
    state = result.state
    del result, student, teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return state
