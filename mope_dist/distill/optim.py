"""Optimizer parameter groups, the warmup + cosine LR schedule, and the DeepSpeed config dict."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from mope_dist.config import DeepSpeedConfig, DistillConfig

NO_DECAY_NAMES = ("embedding", "logit_scale")  # token/positional/class embeddings, temperature


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on matrices; none on norms, biases, embeddings and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: DistillConfig) -> torch.optim.AdamW:
    """torch AdamW (no DeepSpeed kernel to JIT-build; works under every ZeRO stage) with cfg's lr,
    weight_decay, betas and eps. Its fused kernel, on GPU and CPU alike: one launch per step instead of
    several per parameter (3x faster than the default on a 2-core CPU too), and it honours a `found_inf`
    device flag, which lets the trainer's own gradient check skip a step without the host reading it."""
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


@contextlib.contextmanager
def settings_kept(optimizer: torch.optim.Optimizer):
    """Within: a checkpoint load that leaves this run's param-group settings (weight decay, betas, eps,
    the fused kernel) as they were; the state (moments, step counts) is the checkpoint's. torch's
    `load_state_dict` brings back the saved settings: a non-fused flag from a CPU run before AdamW was
    fused there, which refuses the trainer's `found_inf`; and DeepSpeed's universal ZeRO-3 load copies
    the first group's onto every group, weight decay onto norms and biases included. Step counts go
    where the fused kernel keeps them (float32, on their parameter's device)."""
    saved = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, saved, strict=True):
        group.update(settings)
    for p, state in optimizer.state.items():
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to base_lr, cosine decay to min_lr.

    A pure function of the step, so a resumed run gets the same LR as an uninterrupted one.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_ds_config(ds: DeepSpeedConfig, micro_batch_size: int, grad_accum: int, grad_clip: float) -> dict:
    """DeepSpeed config dict (passed to deepspeed.initialize(config=...), never written to a file).

    `ds.extra` is merged last (e.g. {"zero_optimization": {"offload_optimizer": {...}}}), one level deep;
    `grad_clip` 0 leaves clipping to the caller.
    Non-finite gradients skip the step in every precision: fp16 through the dynamic loss scaler,
    bf16 through `check_grad_overflow`; fp32 and amp_bf16 (fp32 weights) through ZeRO's overflow check
    or, under ZeRO-0, the trainer's gradient-norm check.
    """
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {ds.zero_stage}")
    if ds.precision not in ("fp32", "bf16", "fp16", "amp_bf16"):
        raise ValueError(f"precision must be fp32, bf16, fp16 or amp_bf16, got {ds.precision!r}")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "torch_autocast": {"enabled": ds.precision == "amp_bf16", "dtype": "bfloat16"},
        "steps_per_print": 2**31 - 1,  # the trainer does its own logging
        "wall_clock_breakdown": False,
    }
    for key, value in ds.extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
