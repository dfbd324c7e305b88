"""Baseline importance scores with MoPE's interface (same units, same ScoreResult), for ablations.

- magnitude: L1 or L2 norm of the parameters a unit's removal deletes (the same elements its
  `params` counts: q/k/v rows and out-projection columns of a head, c_fc rows and c_proj columns of
  a neuron group, every parameter of a layer).
- random: seeded uniform scores, identical on every rank.
- taylor: first-order Taylor importance sum(|grad * weight|) over the same elements, with the
  gradient of the proxy's loss: zero-shot cross-entropy of the logits against the labels
  (classification) or the cross-entropy of image->text and text->image retrieval over the whole
  gallery (retrieval). The gradient is computed in two stages so it scales like the scorer: the
  features of both towers are encoded without a graph and gathered, the loss is backpropagated to
  the features of this rank's queries, the feature gradients are all-reduced, then each rank
  backpropagates them through the towers for its own micro-batches; one all-reduce of all
  parameter gradients finishes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mope_dist import dist
from mope_dist.model.runtime import autocast_context, eval_mode, model_dtype
from mope_dist.mope.proxies import ClassificationProxy, Proxy, local_batches
from mope_dist.mope.report import ScoreResult
from mope_dist.mope.units import Unit, check_units, tower_of


def unit_tensors(model, unit: Unit, get: Callable[[torch.nn.Parameter], Tensor] = lambda p: p.detach()):
    """The pieces of get(param) that belong to `unit` (their numel sums to unit.params)."""
    block = tower_of(model, unit.tower).blocks[unit.layer]
    if unit.kind == "layer":
        return [get(p) for p in block.parameters()]
    if unit.kind == "head":
        attn = block.attn
        h, d, w = attn.num_heads, attn.head_dim, attn.qkv.in_features
        return [
            get(attn.qkv.weight).view(3, h, d, w)[:, unit.index],
            get(attn.qkv.bias).view(3, h, d)[:, unit.index],
            get(attn.out_proj.weight).view(w, h, d)[:, unit.index],
        ]
    mlp, idx = block.mlp, torch.tensor(unit.neurons, dtype=torch.long, device=block.mlp.c_fc.weight.device)
    return [get(mlp.c_fc.weight)[idx], get(mlp.c_fc.bias)[idx], get(mlp.c_proj.weight)[:, idx]]


def score_magnitude(model, units: Sequence[Unit], p: int = 1) -> ScoreResult:
    """L1 (p=1) or L2 (p=2) norm of each unit's parameters."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    units = list(units)
    check_units(model, units)
    scores = []
    with torch.no_grad():
        for u in units:
            pieces = unit_tensors(model, u)
            total = sum(t.float().abs().sum() if p == 1 else t.float().pow(2).sum() for t in pieces)
            scores.append(float(total if p == 1 else total.sqrt()))
    return ScoreResult(method=f"magnitude-l{p}", units=units, scores=scores, meta={"p": p})


def score_random(units: Sequence[Unit], seed: int = 0) -> ScoreResult:
    """Uniform [0, 1) scores from a seeded generator (the same on every rank)."""
    units = list(units)
    scores = torch.rand(len(units), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ScoreResult(method="random", units=units, scores=scores.tolist(), meta={"seed": seed})


def _encode(tower, inputs: Tensor, device, dtype) -> Tensor:
    inputs = inputs.to(device)
    return F.normalize(tower(inputs.to(dtype) if inputs.is_floating_point() else inputs).float(), dim=-1)


def _class_embeddings(feats: Tensor, num_templates: int) -> Tensor:
    return F.normalize(feats.view(-1, num_templates, feats.shape[-1]).mean(1), dim=-1)


def _streams(model, proxy: Proxy, batch_size: int, rank: int, world: int):
    """(tower, inputs, this rank's row ranges, post-processing of features) for the two towers; the
    classification text stream yields class embeddings, one row per class."""
    if isinstance(proxy, ClassificationProxy):
        k, m, ctx = proxy.class_texts.shape
        per = max(1, batch_size // m)
        texts = proxy.class_texts.reshape(k * m, ctx)
        return [
            (
                model.visual,
                proxy.images,
                local_batches(proxy.images.shape[0], batch_size, rank, world),
                1,
                None,
            ),
            (model.text, texts, local_batches(k, per, rank, world), m, lambda f: _class_embeddings(f, m)),
        ]
    return [
        (model.visual, proxy.images, local_batches(proxy.images.shape[0], batch_size, rank, world), 1, None),
        (model.text, proxy.texts, local_batches(proxy.texts.shape[0], batch_size, rank, world), 1, None),
    ]


def _gather_features(stream, device, dtype, dim: int) -> Tensor:
    """Every row's features without a graph: each rank encodes its rows, a zero-filled sum gathers."""
    tower, inputs, batches, per_row, post = stream
    out = torch.zeros(inputs.shape[0] // per_row, dim, device=device)
    for s, e in batches:
        feats = _encode(tower, inputs[s * per_row : e * per_row], device, dtype)
        out[s:e] = post(feats) if post else feats
    return dist.all_reduce_sum(out)


def _backprop_features(stream, device, dtype, grad: Tensor) -> None:
    """Re-encode this rank's rows with a graph and backpropagate the features' gradient into the tower."""
    tower, inputs, batches, per_row, post = stream
    for s, e in batches:
        feats = _encode(tower, inputs[s * per_row : e * per_row], device, dtype)
        (post(feats) if post else feats).backward(grad[s:e])


def _proxy_loss(
    proxy: Proxy, image_feats: Tensor, other: Tensor, scale: Tensor, rank: int, world: int, bs: int
):
    """Loss over this rank's queries (summed, normalised by the global query counts)."""
    if isinstance(proxy, ClassificationProxy):
        n = proxy.images.shape[0]
        loss = image_feats.new_zeros(())
        for s, e in local_batches(n, bs, rank, world):
            logits = scale * image_feats[s:e] @ other.T
            loss = loss + F.cross_entropy(logits, proxy.labels[s:e].to(logits.device), reduction="sum") / n
        return loss
    t2i = proxy.text_to_image.to(image_feats.device)
    n_img, n_txt = image_feats.shape[0], other.shape[0]
    loss = image_feats.new_zeros(())
    for s, e in local_batches(
        n_img, bs, rank, world
    ):  # image -> text: all captions of the image are positive
        logp = (scale * image_feats[s:e] @ other.T).log_softmax(-1)
        positives = t2i[None, :] == torch.arange(s, e, device=t2i.device)[:, None]
        logp_pos = logp.masked_fill(~positives, float("-inf")).logsumexp(-1)
        loss = loss - logp_pos[positives.any(-1)].sum() / n_img
    for s, e in local_batches(n_txt, bs, rank, world):  # text -> image
        logits = scale * other[s:e] @ image_feats.T
        loss = loss + F.cross_entropy(logits, t2i[s:e], reduction="sum") / n_txt
    return loss / 2


def _grad(t: Tensor) -> Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


def score_taylor(
    model,
    units: Sequence[Unit],
    proxy: Proxy,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    autocast: bool | None = None,
) -> ScoreResult:
    """First-order Taylor importance sum(|grad * weight|) per unit; every rank must call it alike.

    Leaves every parameter's .grad as None and restores requires_grad afterwards.
    """
    device = torch.device(device)
    units = list(units)
    check_units(model, units)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = model_dtype(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        with eval_mode(model), autocast_context(device, autocast):
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            streams = _streams(model, proxy, batch_size, rank, world)
            with torch.no_grad():
                feats = [_gather_features(s, device, dtype, model.spec.embed_dim) for s in streams]
            leaves = [f.clone().requires_grad_(True) for f in feats]
            scale = model.logit_scale.detach().clamp(max=math.log(100)).exp()
            loss = _proxy_loss(proxy, leaves[0], leaves[1], scale, rank, world, batch_size)
            if loss.requires_grad:  # a rank may hold no queries
                loss.backward()
            grads = dist.all_reduce_sum(torch.cat([_grad(leaf).flatten() for leaf in leaves]))
            grads = grads.split([leaf.numel() for leaf in leaves])
            for stream, g, leaf in zip(streams, grads, leaves, strict=True):
                _backprop_features(stream, device, dtype, g.view_as(leaf))
            # every parameter takes part (zeros where this rank's batches never reached it), so
            # every rank all-reduces the same buffer
            flat = dist.all_reduce_sum(torch.cat([_grad(p).flatten().float() for p in params]))
            for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = g.view_as(p).to(p.dtype)
            with torch.no_grad():
                saliency = {id(p): (p.grad.float() * p.detach().float()).abs() for p in params}
                scores = [
                    float(sum(t.sum() for t in unit_tensors(model, u, lambda p: saliency[id(p)])))
                    for u in units
                ]
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
    return ScoreResult(
        method="taylor",
        units=units,
        scores=scores,
        meta={
            "proxy": proxy.kind,
            "loss": float(dist.all_reduce_sum(loss.detach().clone())),
            "world_size": world,
        },
    )
