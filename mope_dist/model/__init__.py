"""Prunable CLIP: per-layer heads / MLP widths / kept layers, open_clip import, masks, slicing, I/O, counts."""

from .clip import PrunableCLIP, TowerMasks
from .convert import from_open_clip, load_teacher
from .counts import count_flops, count_params, format_counts_table, train_flops_per_sample
from .io import create_model_and_transforms, get_tokenizer, load_model, save_pretrained
from .slicing import KeepSpec, TowerKeep, slice_model
from .spec import CLIPSpec, TextSpec, TowerSpec, VisionSpec

__all__ = [
    "CLIPSpec",
    "KeepSpec",
    "PrunableCLIP",
    "TextSpec",
    "TowerKeep",
    "TowerMasks",
    "TowerSpec",
    "VisionSpec",
    "count_flops",
    "count_params",
    "create_model_and_transforms",
    "format_counts_table",
    "from_open_clip",
    "get_tokenizer",
    "load_model",
    "load_teacher",
    "save_pretrained",
    "slice_model",
    "train_flops_per_sample",
]
