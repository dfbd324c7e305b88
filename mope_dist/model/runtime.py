"""Small helpers for running any CLIP-like module (ours, open_clip's, a DeepSpeed engine) in eval code."""

from __future__ import annotations

import contextlib

import torch


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """Dtype inputs must be cast to (a model exported with --dtype bf16 takes bf16 images)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def autocast_context(device: torch.device, enabled: bool | None = None):
    """bf16 autocast on GPU (the usual eval precision); exact fp32 on CPU unless asked otherwise."""
    device = torch.device(device)
    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Switch to eval for the duration, then restore the previous mode (eval runs inside training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
