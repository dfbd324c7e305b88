"""Distillation and pre-training: losses, the DeepSpeed trainer, checkpoints (see trainer.py)."""

from mope_dist.distill.losses import CLIPOutputs, DistillLoss, layer_map
from mope_dist.distill.trainer import (
    TrainArgs,
    TrainResult,
    TrainState,
    export_student,
    full_state_dict,
    train,
)

__all__ = [
    "CLIPOutputs",
    "DistillLoss",
    "TrainArgs",
    "TrainResult",
    "TrainState",
    "export_student",
    "full_state_dict",
    "layer_map",
    "train",
]
