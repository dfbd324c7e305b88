"""The prunable CLIP: open_clip's ViT/text transformer with per-layer head counts and MLP widths.

nn.MultiheadAttention ties the attention inner width to the residual width, so heads cannot be removed
from it; this module uses its own attention (packed qkv Linear + F.scaled_dot_product_attention) whose
inner width is heads * head_dim. The towers expose a staged forward (embed -> run_blocks -> head) so
scoring can evaluate many masked candidates in one batch and distillation can read hidden states.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .spec import CLIPSpec, TextSpec, TowerSpec, VisionSpec


@dataclass
class TowerMasks:
    """Masks for C candidates evaluated in one batch of C*N rows (candidate c owns rows c*N:(c+1)*N).

    head[l]: [C, heads_l], mlp[l]: [C, mlp_dim_l], layer: [C, L]; 1 keeps a unit, 0 removes it. Entries
    may be None (nothing masked there). Masks are multiplicative, so fractional values and gradients
    with respect to them are allowed.
    """

    head: list[Tensor | None] | None = None
    mlp: list[Tensor | None] | None = None
    layer: Tensor | None = None

    def num_candidates(self) -> int:
        for m in [self.layer, *(self.head or []), *(self.mlp or [])]:
            if m is not None:
                return m.shape[0]
        return 1


def _rows(mask: Tensor | None, n: int, dtype: torch.dtype) -> Tensor | None:
    """[C, K] candidate mask -> [C*n, K] per-row mask (candidate-major)."""
    if mask is None:
        return None
    c, k = mask.shape
    return mask.to(dtype)[:, None, :].expand(c, n, k).reshape(c * n, k)


def _repeat_rows(t: Tensor, rows: int) -> Tensor:
    """Inputs [N, ...] for a batch of C*N rows (candidates share the inputs)."""
    return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], *[1] * (t.ndim - 1))


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention whose head count is independent of the residual width.

    qkv rows are laid out [q heads | k heads | v heads], each head_dim rows per head, like open_clip's
    in_proj_weight, so importing is a copy and pruning a head is a row/column slice.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(width, 3 * num_heads * head_dim)
        self.out_proj = nn.Linear(num_heads * head_dim, width)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        if self.num_heads == 0:  # every head removed: the branch is its output bias
            return torch.zeros_like(x) + self.out_proj.bias.to(x.dtype)
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        if head_mask is not None:
            y = y * head_mask[:, :, None, None]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor, neuron_mask: Tensor | None = None) -> Tensor:
        if self.c_fc.out_features == 0:  # every neuron removed: the branch is its output bias
            return torch.zeros_like(x) + self.c_proj.bias.to(x.dtype)
        h = self.act(self.c_fc(x))
        if neuron_mask is not None:
            h = h * neuron_mask[:, None, :]
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, head_dim: int, mlp_dim: int, spec: TowerSpec, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=spec.norm_eps)
        self.attn = Attention(width, num_heads, head_dim)
        self.ls_1 = LayerScale(width) if spec.layer_scale else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=spec.norm_eps)
        self.mlp = MLP(width, mlp_dim, act)
        self.ls_2 = LayerScale(width) if spec.layer_scale else nn.Identity()

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp.c_fc.out_features

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        head_mask: Tensor | None = None,
        mlp_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), attn_mask, is_causal, head_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x), mlp_mask))


class Tower(nn.Module):
    """Shared staged forward: embed(inputs) -> run_blocks(x) -> head(x, inputs)."""

    spec: TowerSpec

    def _build_blocks(self, spec: TowerSpec, act: str) -> None:
        self.blocks = nn.ModuleList(
            Block(spec.width, h, spec.head_dim, m, spec, act)
            for h, m in zip(spec.heads, spec.mlp_dims, strict=True)
        )
        self.grad_checkpointing = False

    def _attn_args(self, x: Tensor, inputs: Tensor | None) -> tuple[Tensor | None, bool]:
        return None, False

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        end: int | None = None,
        masks: TowerMasks | None = None,
        return_hidden: bool = False,
        inputs: Tensor | None = None,
    ):
        """Run blocks start..end-1 on the stream x, optionally under candidate masks.

        `inputs` (the tower's raw inputs) is only needed by text towers with padding masks.
        Returns x, or (x, [output of each block run]) with return_hidden.
        """
        end = len(self.blocks) if end is None else end
        attn_mask, is_causal = self._attn_args(x, inputs)
        n = x.shape[0]
        if masks is not None:
            c = masks.num_candidates()
            if n % c:
                raise ValueError(f"batch of {n} rows is not a multiple of {c} candidates")
            n //= c
        hiddens = []
        for i in range(start, end):
            block = self.blocks[i]
            head_mask = mlp_mask = layer_mask = None
            if masks is not None:
                head_mask = _rows(masks.head[i], n, x.dtype) if masks.head else None
                mlp_mask = _rows(masks.mlp[i], n, x.dtype) if masks.mlp else None
                layer_mask = _rows(masks.layer[:, i : i + 1], n, x.dtype) if masks.layer is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                y = checkpoint(block, x, attn_mask, is_causal, head_mask, mlp_mask, use_reentrant=False)
            else:
                y = block(x, attn_mask, is_causal, head_mask, mlp_mask)
            if layer_mask is not None:  # 0 -> the block is the identity (exact: 0*y + 1*x == x)
                lm = layer_mask[:, :, None]
                y = lm * y + (1 - lm) * x
            x = y
            if return_hidden:
                hiddens.append(x)
        return (x, hiddens) if return_hidden else x

    def forward(self, inputs: Tensor, masks: TowerMasks | None = None, return_hidden: bool = False):
        """Unnormalised features (and hidden states with return_hidden). With masks, inputs [N, ...]
        are shared by all C candidates and the output has C*N rows."""
        x = self.embed(inputs)
        if masks is not None:
            x = _repeat_rows(x, x.shape[0] * masks.num_candidates())
        out = self.run_blocks(x, masks=masks, return_hidden=return_hidden, inputs=inputs)
        x, hiddens = out if return_hidden else (out, None)
        features = self.head(x, inputs)
        return (features, hiddens) if return_hidden else features


class VisionTower(Tower):
    def __init__(self, spec: VisionSpec, embed_dim: int, act: str):
        super().__init__()
        self.spec = spec
        w = spec.width
        scale = w**-0.5
        self.image_size, self.patch_size = tuple(spec.image_size), tuple(spec.patch_size)
        self.conv1 = nn.Conv2d(3, w, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(spec.num_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=spec.norm_eps) if spec.ln_pre else nn.Identity()
        self._build_blocks(spec, act)
        self.ln_post = nn.LayerNorm(w, eps=spec.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))

    def embed(self, image: Tensor) -> Tensor:
        x = self.conv1(image).flatten(2).transpose(1, 2)  # [N, grid, width]
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def head(self, x: Tensor, inputs: Tensor | None = None) -> Tensor:
        if not self.spec.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 1:].mean(dim=1) if self.spec.pool_type == "avg" else x[:, 0]
        if self.spec.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled @ self.proj


class TextTower(Tower):
    def __init__(self, spec: TextSpec, embed_dim: int, act: str):
        super().__init__()
        self.spec = spec
        w = spec.width
        self.context_length, self.vocab_size = spec.context_length, spec.vocab_size
        self.token_embedding = nn.Embedding(spec.vocab_size, w)
        self.cls_emb = nn.Parameter(torch.empty(w)) if spec.embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(spec.num_tokens, w))
        self._build_blocks(spec, act)
        self.ln_final = nn.LayerNorm(w, eps=spec.norm_eps)
        if spec.proj_type == "linear":
            self.text_projection = nn.Linear(w, embed_dim)
        elif spec.proj_type == "param":
            self.text_projection = nn.Parameter(torch.empty(w, embed_dim))
        else:
            self.text_projection = None
        self._init_like_open_clip()

    def _init_like_open_clip(self) -> None:
        """open_clip's TextTransformer init, so a spec built from scratch trains like open_clip's."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        w, n = self.spec.width, max(1, len(self.blocks))
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=w**-0.5)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=(w**-0.5) * ((2 * n) ** -0.5))
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=(w**-0.5) * ((2 * n) ** -0.5))
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=w**-0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=w**-0.5)

    def embed(self, text: Tensor) -> Tensor:
        x = self.token_embedding(text)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
        return x + self.positional_embedding[: x.shape[1]].to(x.dtype)

    def _attn_args(self, x: Tensor, inputs: Tensor | None) -> tuple[Tensor | None, bool]:
        """Causal via SDPA's is_causal; with a padding mask, a boolean keep-mask per row [B, 1, T, T]
        (boolean, so it also works when autocast runs attention in a lower precision than x)."""
        spec = self.spec
        if not (spec.pad_mask or spec.embed_cls):
            return None, spec.causal
        if inputs is None:
            raise ValueError(
                "this text tower masks padding: pass the token ids as run_blocks(..., inputs=text)"
            )
        valid = _repeat_rows(inputs, x.shape[0]) != spec.pad_id
        if spec.embed_cls:
            ones = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, ones] if spec.correct_cls_mask else [ones, valid], dim=1)
        T = x.shape[1]
        mask = valid[:, None, None, :].expand(-1, 1, T, -1)
        if spec.causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return mask, False

    def head(self, x: Tensor, text: Tensor) -> Tensor:
        pool = "cls" if self.spec.embed_cls else self.spec.pool_type
        x = self.ln_final(x[:, -1]) if pool == "cls" else self.ln_final(x)  # open_clip: LN after the cls pool
        if pool == "cls":
            pooled = x
        elif pool == "first":
            pooled = x[:, 0]
        elif pool == "last":
            pooled = x[:, -1]
        else:
            text = _repeat_rows(text, x.shape[0])
            idx = text.argmax(dim=-1) if pool == "argmax" else (text == self.spec.eos_id).int().argmax(dim=-1)
            pooled = x.gather(1, idx.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(
                1
            )  # x[arange, idx], faster
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled if self.text_projection is None else pooled @ self.text_projection


class PrunableCLIP(nn.Module):
    """CLIP with open_clip's interface (encode_image/encode_text/forward/logit_scale) on a CLIPSpec."""

    def __init__(self, spec: CLIPSpec):
        super().__init__()
        self.spec = spec
        self.visual = VisionTower(spec.vision, spec.embed_dim, spec.activation)
        self.text = TextTower(spec.text, spec.embed_dim, spec.activation)
        self.context_length, self.vocab_size = spec.text.context_length, spec.text.vocab_size
        self.logit_scale = nn.Parameter(torch.ones([]) * spec.init_logit_scale)
        self.logit_bias = None
        if spec.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.ones([]) * spec.init_logit_bias)

    def encode_image(self, image: Tensor, normalize: bool = False, return_hidden: bool = False):
        return self._encode(self.visual, image, normalize, return_hidden)

    def encode_text(self, text: Tensor, normalize: bool = False, return_hidden: bool = False):
        return self._encode(self.text, text, normalize, return_hidden)

    @staticmethod
    def _encode(tower: Tower, inputs: Tensor, normalize: bool, return_hidden: bool):
        out = tower(inputs, return_hidden=return_hidden)
        feats, hiddens = out if return_hidden else (out, None)
        feats = F.normalize(feats, dim=-1) if normalize else feats
        return (feats, hiddens) if return_hidden else feats

    def forward(self, image: Tensor | None = None, text: Tensor | None = None):
        """Like open_clip.CLIP.forward; the logit scale is clamped to <= ln(100) here, not after the
        optimizer step, because under ZeRO a post-step clamp touches only the working copy."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        logit_scale = self.logit_scale.clamp(max=math.log(100)).exp()
        if self.logit_bias is not None:
            return image_features, text_features, logit_scale, self.logit_bias
        return image_features, text_features, logit_scale

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.grad_checkpointing = self.text.grad_checkpointing = enable


def build_on_meta(spec: CLIPSpec) -> PrunableCLIP:
    """A PrunableCLIP without storage or random init, to be filled by load_state_dict(..., assign=True)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return PrunableCLIP(spec)
