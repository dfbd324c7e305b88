"""The DeepSpeed side of training: building the student's engine, reading its full weights, exporting
the student, and freeing the engine afterwards. The only module here that calls `deepspeed.initialize`."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as tdist

from mope_dist import dist
from mope_dist.config import DeepSpeedConfig, DistillConfig
from mope_dist.distill.optim import build_ds_config, make_optimizer


def own_clipping(ds: DeepSpeedConfig) -> bool:
    """ZeRO-0 with fp32 weights (fp32, amp_bf16) runs the plain torch optimizer, whose gradients
    DeepSpeed neither clips nor checks for inf/NaN: the trainer does both itself."""
    return ds.zero_stage == 0 and ds.precision in ("fp32", "amp_bf16")


def build_engine(student: torch.nn.Module, cfg: DistillConfig, ds: DeepSpeedConfig, micro_batch_size: int):
    """`deepspeed.initialize` on the student with torch AdamW and the generated DS config; train mode."""
    import deepspeed

    _ensure_process_group()
    grad_clip = 0.0 if own_clipping(ds) else cfg.grad_clip
    ds_config = build_ds_config(ds, micro_batch_size, cfg.grad_accum, grad_clip)
    optimizer = make_optimizer(student, cfg)
    _promote_scalar_params(student)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    engine.train()
    return engine


def _ensure_process_group() -> None:
    """deepspeed.initialize needs a process group; a plain `python` run gets a 1-process one."""
    if tdist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_distributed(use_deepspeed=True)


def _promote_scalar_params(model: torch.nn.Module) -> None:
    """Reshape 0-dim parameters (logit_scale) to [1], in place.

    deepspeed 0.19 cannot take 0-dim parameters: its initial broadcast (all stages) and ZeRO-3's
    partitioning call `p.data.view(torch.uint8)`, which raises for scalars, and its ZeRO-0 gradient
    clipping fails on them. A 1-element logit scale broadcasts identically in the forward; checkpoints
    therefore hold logit_scale as [1], and `export_student` reshapes it back to the model's [].
    """
    for p in model.parameters():
        if p.ndim == 0:
            p.data = p.data.reshape(1)


def gathered(engine):
    """Full student parameters on every rank for the duration (ZeRO-3 only; a no-op otherwise)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 student weights on every rank (the optimizer's master copy where there is one). Collective.

    Shapes are the engine's (logit_scale [1], see `_promote_scalar_params`)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # ZeRO 1-3 / bf16: master weights (gathered under ZeRO-3)
        if full is None:  # ZeRO-0 fp32/fp16: the module weights are the weights
            full = p.detach()
        state[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        state[name] = b.detach().cpu().clone()
    return state


def export_student(engine, path: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Save the trained student as a standalone model dir (mope_dist.model.save_pretrained). Collective."""
    from mope_dist.model.clip import build_on_meta
    from mope_dist.model.io import save_pretrained

    state = full_state_dict(engine)
    if dist.is_main():
        model = build_on_meta(engine.module.spec)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()}, strict=True, assign=True)
        save_pretrained(model, path, provenance=provenance)
    dist.barrier()
    return Path(path)


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
