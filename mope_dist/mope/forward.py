"""The scoring engine's forwards: each candidate removes one unit of one layer, which makes three exact
shortcuts possible (exact in real arithmetic; in floating point they differ from a masked forward by
rounding only).

- Shared block parts: block l is computed once per micro-batch without masks, keeping its pieces
  (per-head attention outputs, attention output, stream after attention, MLP activations, MLP
  output). Removing head j subtracts that head's share of the out-projection from the attention
  output (only the MLP half is rerun for the candidate); removing a neuron group subtracts its
  c_proj columns' share from the MLP output (nothing is rerun); removing the layer passes the stream
  through. The unmasked output advances the stream to layer l + 1, so no separate prefix forward.
- Blocks after the candidate's layer carry no mask: plain blocks on the candidates' rows.
- Only the pooled token of the last block reaches the features: its query, MLP and residual are
  computed for that token alone (keys and values still for every token). Not with average pooling,
  where every token is pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mope_dist.model.spec import TextSpec
from mope_dist.mope.units import Unit


@dataclass
class BlockParts:
    """One block's unmasked pieces for n rows over T' tokens (T' = 1 when only the pooled token)."""

    x: Tensor  # stream entering the block at those tokens [n, T', W]
    heads: Tensor  # attention output of each head, before the out-projection [n, T', H, d]
    attn: Tensor  # out-projection output [n, T', W]
    mid: Tensor  # x + ls_1(attn)
    hidden: Tensor  # MLP activations [n, T', mlp]
    mlp: Tensor  # c_proj output [n, T', W]
    out: Tensor  # mid + ls_2(mlp)


def pooled_positions(tower, inputs: Tensor, tokens: int) -> Tensor | None:
    """Index of the token each row's features are pooled from (as the tower's head pools), or None
    when the head averages tokens. `tokens` is the stream's length."""
    spec, n, device = tower.spec, inputs.shape[0], inputs.device
    if not isinstance(spec, TextSpec):
        return None if spec.pool_type == "avg" else torch.zeros(n, dtype=torch.long, device=device)
    pool = "cls" if spec.embed_cls else spec.pool_type
    if pool == "first":
        return torch.zeros(n, dtype=torch.long, device=device)
    if pool in ("cls", "last"):
        return torch.full((n,), tokens - 1, dtype=torch.long, device=device)
    return inputs.argmax(-1) if pool == "argmax" else (inputs == spec.eos_id).int().argmax(-1)


def _query_mask(mask: Tensor | None, causal: bool, pos: Tensor, tokens: int) -> Tensor | None:
    """The attention mask rows [n, 1, 1, T] of the pooled queries."""
    if mask is not None:
        return mask[torch.arange(pos.shape[0], device=pos.device), :, pos][:, :, None, :]
    if causal:
        return (torch.arange(tokens, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
    return None


def block_parts(block, x: Tensor, mask: Tensor | None, causal: bool, pos: Tensor | None = None) -> BlockParts:
    """Block.forward split into its pieces; with `pos`, queries (and everything after attention)
    only at token pos[i] of row i."""
    n, tokens, width = x.shape
    attn = block.attn
    h, d = attn.num_heads, attn.head_dim
    normed = block.ln_1(x)
    if pos is not None:
        rows = torch.arange(n, device=x.device)
        x = x[rows, pos][:, None]
        mask, causal = _query_mask(mask, causal, pos, tokens), False
    if h == 0:  # every head removed: the branch is its output bias
        heads = x.new_zeros(n, x.shape[1], 0, d)
        attn_out = torch.zeros_like(x) + attn.out_proj.bias.to(x.dtype)
    else:
        if pos is None:
            q, k, v = attn.qkv(normed).view(n, tokens, 3, h, d).permute(2, 0, 3, 1, 4)
        else:
            w, b = attn.qkv.weight, attn.qkv.bias
            k, v = F.linear(normed, w[h * d :], b[h * d :]).view(n, tokens, 2, h, d).permute(2, 0, 3, 1, 4)
            q = F.linear(normed[rows, pos], w[: h * d], b[: h * d]).view(n, h, 1, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        heads = y.transpose(1, 2)
        attn_out = attn.out_proj(heads.reshape(n, x.shape[1], h * d))
    mid = x + block.ls_1(attn_out)
    mlp = block.mlp
    if mlp.c_fc.out_features == 0:
        hidden = x.new_zeros(n, x.shape[1], 0)
        mlp_out = torch.zeros_like(x) + mlp.c_proj.bias.to(x.dtype)
    else:
        hidden = mlp.act(mlp.c_fc(block.ln_2(mid)))
        mlp_out = mlp.c_proj(hidden)
    return BlockParts(x, heads, attn_out, mid, hidden, mlp_out, mid + block.ls_2(mlp_out))


def candidate_outputs(block, parts: BlockParts, units: Sequence[Unit]) -> Tensor:
    """Output of the block without units[c], for each candidate c (all of this block): [C, n, T', W]."""
    out: list[Tensor | None] = [None] * len(units)
    mids, head_rows = [], []
    d = block.attn.head_dim
    for c, u in enumerate(units):
        if u.kind == "layer":
            out[c] = parts.x
        elif u.kind == "head":
            w = block.attn.out_proj.weight[:, u.index * d : (u.index + 1) * d]
            mids.append(parts.x + block.ls_1(parts.attn - parts.heads[..., u.index, :] @ w.T))
            head_rows.append(c)
        else:
            idx = torch.tensor(u.neurons, dtype=torch.long, device=parts.hidden.device)
            share = parts.hidden.index_select(-1, idx) @ block.mlp.c_proj.weight.index_select(1, idx).T
            out[c] = parts.mid + block.ls_2(parts.mlp - share)
    if mids:  # the head candidates' MLP halves in one batch
        mid = torch.cat(mids)
        rerun = (mid + block.ls_2(block.mlp(block.ln_2(mid)))).chunk(len(mids))
        for c, y in zip(head_rows, rerun, strict=True):
            out[c] = y
    return torch.stack(out)


class StagedForward:
    """One micro-batch of one tower: the stream is advanced layer by layer (in increasing order) and
    each layer's unmasked parts are computed once; candidates of a layer are finished from them."""

    def __init__(self, tower, inputs: Tensor):
        self.tower, self.inputs = tower, inputs
        self.x = tower.embed(inputs)
        self.at, self.last = 0, len(tower.blocks) - 1
        self.pos = pooled_positions(tower, inputs, self.x.shape[1])
        self.cached: tuple[int, BlockParts] | None = None

    def _attn_args(self, x: Tensor):
        return self.tower._attn_args(x, self.inputs)

    def parts(self, layer: int) -> BlockParts:
        if self.cached is not None and self.cached[0] == layer:
            return self.cached[1]
        if layer < self.at:
            raise ValueError(f"layers must be visited in increasing order ({layer} after {self.at})")
        self.x = self.tower.run_blocks(self.x, self.at, layer, inputs=self.inputs)
        pooled = self.pos if layer == self.last else None
        parts = block_parts(self.tower.blocks[layer], self.x, *self._attn_args(self.x), pooled)
        if pooled is None:
            self.x, self.at = parts.out, layer + 1
        else:
            self.at = layer
        self.cached = (layer, parts)
        return parts

    def features(self) -> Tensor:
        """Normalised fp32 features [n, D] of the unmasked tower."""
        return F.normalize(self._head(self.parts(self.last).out), dim=-1)

    def candidate_features(self, units: Sequence[Unit]) -> Tensor:
        """Normalised fp32 features [C, n, D] without units[c] (all units of one layer)."""
        layer = units[0].layer
        block = self.tower.blocks[layer]
        y = candidate_outputs(block, self.parts(layer), units)
        c, n = y.shape[:2]
        y = y.reshape(c * n, *y.shape[2:])
        if layer < self.last:
            y = self.tower.run_blocks(y, layer + 1, self.last, inputs=self.inputs)
            pos = None if self.pos is None else self.pos.repeat(c)
            y = block_parts(self.tower.blocks[self.last], y, *self._attn_args(y), pos).out
        return F.normalize(self._head(y), dim=-1).view(c, n, -1)

    def _head(self, y: Tensor) -> Tensor:
        if self.pos is None:
            return self.tower.head(y, self.inputs).float()
        # a one-token stream: every pooling rule picks its only token (token ids 0 are never used)
        return self.tower.head(y, torch.zeros(y.shape[0], 1, dtype=torch.long, device=y.device)).float()
