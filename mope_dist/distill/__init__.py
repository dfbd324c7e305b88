"""Distillation and pre-training: losses, the DeepSpeed trainer, checkpoints (see trainer.py)."""

from mope_dist.distill.engine import export_student, full_state_dict, release_engine
from mope_dist.distill.losses import CLIPOutputs, DistillLoss, layer_map, make_loss
from mope_dist.distill.trainer import TrainResult, TrainState, train

__all__ = [
    "CLIPOutputs",
    "DistillLoss",
    "TrainResult",
    "TrainState",
    "export_student",
    "full_state_dict",
    "layer_map",
    "make_loss",
    "release_engine",
    "train",
]
