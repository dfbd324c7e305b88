"""DeepSpeed checkpoint files read with torch.load(weights_only=True), never with arbitrary unpickling.

DeepSpeed 0.19 reads its own files with `weights_only=False` in the engine's checkpoint engine, in
zero_to_fp32 and in the universal-checkpoint code (ds_to_universal, the loader it feeds, and the ZeRO
optimizers' universal loaders). Within
`weights_only_loading()` all of those read through `safe_torch_load` instead, which allows only the
few non-tensor classes DeepSpeed puts in its files (loss scaler, ZeRO stage enum, fragment addresses).
"""

from __future__ import annotations

import contextlib
import importlib

import torch

# DeepSpeed modules that call `torch.load(..., weights_only=False)` on checkpoint files
DS_LOADING_MODULES = (
    "deepspeed.utils.zero_to_fp32",
    "deepspeed.checkpoint.ds_to_universal",
    "deepspeed.checkpoint.deepspeed_checkpoint",
    "deepspeed.checkpoint.zero_checkpoint",
    "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.runtime.base_optimizer",  # ZeRO 1-2 optimizer state from a universal checkpoint
    "deepspeed.runtime.zero.stage3",  # ZeRO-3's, and its fp32 / moment fragments
)


def _ds_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 puts in its checkpoint files (ZeRO 0-3, fp32/bf16/fp16,
    universal checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None, **kwargs):
    """torch.load of a DeepSpeed checkpoint file without arbitrary unpickling (weights_only=True)."""
    kwargs.pop("weights_only", None)
    with torch.serialization.safe_globals(_ds_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


class _SafeTorch:
    """Stands in for the `torch` module inside DeepSpeed's checkpoint modules: only `load` differs."""

    load = staticmethod(safe_torch_load)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def weights_only_loading(engine=None):
    """Within: DeepSpeed reads checkpoints with `safe_torch_load` (the engine's checkpoint engine, and
    the modules in DS_LOADING_MODULES), never with weights_only=False."""
    modules = [importlib.import_module(name) for name in DS_LOADING_MODULES]
    saved = [m.torch for m in modules]
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    for m in modules:
        m.torch = _SafeTorch()
    if ckpt_engine is not None:
        ckpt_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location)
    try:
        yield
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.torch = original
        if ckpt_engine is not None:
            del ckpt_engine.load  # back to the class's method
