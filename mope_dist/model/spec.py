"""Architecture specs: everything needed to rebuild a (pruned) CLIP, as plain JSON-able dataclasses.

A pruned model differs from its teacher only in per-layer head counts, MLP widths and which layers are
kept, so those are lists; everything else (widths of the residual stream, pooling, norms) is copied
from the teacher and must never change, or embeddings stop matching.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


@dataclass
class TowerSpec:
    """Fields shared by both towers. `heads`, `mlp_dims`, `source_layers` have one entry per kept layer."""

    width: int
    head_dim: int
    heads: list[int]
    mlp_dims: list[int]
    source_layers: list[int] = field(default_factory=list)
    layer_scale: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if not self.source_layers:
            self.source_layers = list(range(len(self.heads)))
        n = len(self.heads)
        if len(self.mlp_dims) != n or len(self.source_layers) != n:
            raise ValueError(
                f"heads ({n}), mlp_dims ({len(self.mlp_dims)}) and source_layers ({len(self.source_layers)}) "
                "must have one entry per layer"
            )
        if any(h < 0 for h in self.heads) or any(m < 0 for m in self.mlp_dims):
            raise ValueError("head counts and MLP widths must be >= 0")

    @property
    def num_layers(self) -> int:
        return len(self.heads)


@dataclass
class VisionSpec(TowerSpec):
    image_size: list[int] = field(default_factory=lambda: [224, 224])  # [height, width]
    patch_size: list[int] = field(default_factory=lambda: [16, 16])
    pool_type: str = "tok"  # 'tok' (class token) or 'avg' (mean of patch tokens)
    ln_pre: bool = True
    final_ln_after_pool: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.image_size = _pair(self.image_size)
        self.patch_size = _pair(self.patch_size)
        if self.pool_type not in ("tok", "avg"):
            raise ValueError(f"vision pool_type must be 'tok' or 'avg', got {self.pool_type!r}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1]) + 1


@dataclass
class TextSpec(TowerSpec):
    context_length: int = 77
    vocab_size: int = 49408
    pool_type: str = "argmax"  # 'argmax' (EOT = highest token id), 'eos', 'first', 'last'
    eos_id: int = 2
    causal: bool = True
    proj_type: str = "param"  # 'param' (x @ W), 'linear' (with bias), 'none'
    # CoCa-style appended class token: pooled from the last position, LN after pooling, and a padding mask
    embed_cls: bool = False
    pad_mask: bool = False  # mask padding keys (token == pad_id); implied by embed_cls
    pad_id: int = 0
    correct_cls_mask: bool = False  # open_clip's flag: where the class token's key sits in the pad mask

    def __post_init__(self):
        super().__post_init__()
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise ValueError(f"text pool_type must be argmax/eos/first/last, got {self.pool_type!r}")
        if self.proj_type not in ("param", "linear", "none"):
            raise ValueError(f"text proj_type must be param/linear/none, got {self.proj_type!r}")

    @property
    def num_tokens(self) -> int:
        return self.context_length + self.embed_cls


@dataclass
class CLIPSpec:
    embed_dim: int
    vision: VisionSpec
    text: TextSpec
    activation: str = "gelu"
    init_logit_scale: float = 2.6592600345611572  # ln(1/0.07), open_clip's default
    init_logit_bias: float | None = None
    # open_clip PreprocessCfg fields (size, mean, std, interpolation, resize_mode, fill_color, mode)
    preprocess: dict = field(default_factory=dict)
    # {"type": "simple", "context_length": int, "kwargs": {...}} for open_clip's SimpleTokenizer
    tokenizer: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.tokenizer:
            self.tokenizer = {"type": "simple", "context_length": self.text.context_length, "kwargs": {}}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPSpec:
        d = dict(d)
        return cls(vision=VisionSpec(**d.pop("vision")), text=TextSpec(**d.pop("text")), **d)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]
