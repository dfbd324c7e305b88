"""Shared tiny-model builders: real open_clip models small enough that every test runs in seconds."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Test the working tree. Also works around setuptools' editable finder registering `mope_dist` as a
# namespace package (its __init__.py, and so `mope_dist.load_model`, is skipped when the repo root is
# not on sys.path, as under pytest).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waiting made the
# model tests 4x slower (128 s vs 32 s). Subprocesses (launchers, DataLoader workers) are unaffected.
torch.set_num_threads(int(os.environ.get("MOPE_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
CONTEXT_LENGTH = 16
VOCAB_SIZE = 49408  # open_clip's BPE vocabulary, so the real tokenizer works


def tiny_open_clip_cfg(
    act: str = "gelu",
    layer_scale: bool = False,
    pool: str = "tok",
    patch: int = 8,
    width: int = 64,
    layers: int = 2,
    head_width: int = 16,
    text_width: int | None = None,
    text_layers: int | None = None,
    embed_dim: int = 32,
    **vision_extra,
) -> dict:
    """An open_clip model_cfg dict (as in model_configs/*.json) for a tiny CLIP."""
    text_width = text_width or width
    vision_cfg = dict(
        image_size=IMAGE_SIZE,
        patch_size=patch,
        width=width,
        layers=layers,
        head_width=head_width,
        mlp_ratio=4.0,
        pool_type=pool,
        ls_init_value=0.5 if layer_scale else None,
    )
    vision_cfg.update(vision_extra)
    text_cfg = dict(
        context_length=CONTEXT_LENGTH,
        vocab_size=VOCAB_SIZE,
        width=text_width,
        heads=text_width // head_width,
        layers=text_layers or layers,
        mlp_ratio=4.0,
        ls_init_value=0.5 if layer_scale else None,
    )
    return dict(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=act == "quick_gelu")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random non-trivial values (zero biases / unit LN would hide slicing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("logit_scale", "logit_bias", "token_embedding.weight")):
                continue  # the (large) token table is already random
            scale = 0.5 if p.ndim == 1 else p.shape[-1] ** -0.5
            base = 1.0 if ("ln" in name and name.endswith("weight")) or name.endswith("gamma") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return model


def tiny_open_clip(seed: int = 0, custom_text: bool = False, **kw):
    """A tiny randomised open_clip.CLIP (or CustomTextCLIP) in eval mode."""
    import open_clip

    cfg = tiny_open_clip_cfg(**kw)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    torch.manual_seed(seed)
    return randomize_(cls(**cfg), seed).eval()


def tiny_images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def tiny_texts(n: int = 3, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like the tokenizer's: SOT, random words, EOT (the max id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, CONTEXT_LENGTH, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(3, CONTEXT_LENGTH + 1, (1,), generator=g))
        out[i, 0] = VOCAB_SIZE - 2
        out[i, 1 : length - 1] = torch.randint(1, VOCAB_SIZE - 2, (length - 2,), generator=g)
        out[i, length - 1] = VOCAB_SIZE - 1
    return out


@pytest.fixture
def tiny_clip():
    """Factory fixture: tiny_clip(**kw) -> tiny open_clip CLIP (see tiny_open_clip)."""
    return tiny_open_clip


def free_port() -> int:
    """A TCP port free right now on loopback, for MASTER_PORT of launched test jobs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra) -> dict:
    """Environment for launch/*.sh in tests: CPU, offline, this interpreter, the shared extension cache."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    env.update({k: str(v) for k, v in extra.items()})
    return env
