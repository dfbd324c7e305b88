"""Config sections -> the trainer, and what a finished DeepSpeed engine leaves behind in the process."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from mope_dist.config import Config
from mope_dist.distill.trainer import TrainArgs, TrainState, export_student, train
from mope_dist.recipes.builders import micro_batch_size


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
