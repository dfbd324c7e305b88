"""The one standalone model format: DIR/model.safetensors + DIR/config.json (spec + provenance).

Loadable with nothing but torch, safetensors and open_clip (no pickle, no DeepSpeed); written atomically
so a crash never leaves a half-written model directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import load_file, save_file

from ..utils import atomic_dir
from .clip import PrunableCLIP, build_on_meta
from .counts import count_flops, count_params
from .spec import CLIPSpec

FORMAT = "mope-dist-clip"
FORMAT_VERSION = 1


def save_pretrained(
    model: PrunableCLIP, path: str | os.PathLike, provenance: dict | None = None, overwrite: bool = True
) -> Path:
    """Write the model; provenance (teacher name, plan, ...) is stored verbatim next to the spec and counts."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "counts": {"params": count_params(model.spec), "flops": count_flops(model.spec)},
        "provenance": provenance or {},
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def is_model_dir(path) -> bool:
    p = Path(str(path))
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        return False
    return json.loads((p / "config.json").read_text()).get("format") == FORMAT


def read_config(path: str | os.PathLike) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json is not a {FORMAT} model config")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> PrunableCLIP:
    """Rebuild the model from config.json (no random init: built on the meta device) and load its weights."""
    spec = CLIPSpec.from_dict(read_config(path)["spec"])
    model = build_on_meta(spec)
    state = load_file(str(Path(path) / "model.safetensors"), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def preprocess_cfg(model_or_spec: PrunableCLIP | CLIPSpec) -> PreprocessCfg:
    """open_clip's PreprocessCfg of the model (its image size, mean/std, interpolation, resize mode)."""
    spec = model_or_spec.spec if isinstance(model_or_spec, PrunableCLIP) else model_or_spec
    return PreprocessCfg(**{**spec.preprocess, "size": list(spec.vision.image_size)})


def transforms(model_or_spec: PrunableCLIP | CLIPSpec):
    """open_clip's (preprocess_train, preprocess_val) for the model's image size and mean/std."""
    cfg = preprocess_cfg(model_or_spec)
    return image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)


def create_model_and_transforms(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (model, preprocess_train, preprocess_val), like open_clip.create_model_and_transforms."""
    model = load_model(path, device)
    return (model, *transforms(model))


def get_tokenizer(dir_or_model: str | os.PathLike | PrunableCLIP) -> SimpleTokenizer:
    """open_clip's tokenizer with the model's context length (open_clip.tokenize always uses 77)."""
    if isinstance(dir_or_model, PrunableCLIP):
        spec = dir_or_model.spec
    else:
        spec = CLIPSpec.from_dict(read_config(dir_or_model)["spec"])
    info = spec.tokenizer
    if info.get("type", "simple") != "simple":
        raise ValueError(f"unsupported tokenizer {info!r}; only open_clip's SimpleTokenizer is supported")
    return SimpleTokenizer(
        context_length=info.get("context_length", spec.text.context_length), **info.get("kwargs", {})
    )
