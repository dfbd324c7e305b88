"""Physical pruning: copy the kept heads, neurons and layers into a new, genuinely smaller dense model.

A head is its q/k/v rows and its out_proj columns; a neuron is its c_fc row and c_proj column. Output
biases (out_proj, c_proj) belong to no unit and are always kept, which is exactly what the scoring
masks compute, so a masked model and its sliced counterpart give the same outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .clip import PrunableCLIP, build_on_meta
from .spec import CLIPSpec, TowerSpec

TOWERS = {"vision": "visual", "text": "text"}  # spec name -> module attribute


@dataclass
class TowerKeep:
    """What to keep, as indices into the model being pruned. A layer absent from heads/mlp keeps all."""

    layers: list[int]
    heads: dict[int, list[int]] = field(default_factory=dict)
    mlp: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "heads": {str(k): list(v) for k, v in self.heads.items()},
            "mlp": {str(k): list(v) for k, v in self.mlp.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> TowerKeep:
        return cls(
            layers=[int(i) for i in d["layers"]],
            heads={int(k): [int(i) for i in v] for k, v in d.get("heads", {}).items()},
            mlp={int(k): [int(i) for i in v] for k, v in d.get("mlp", {}).items()},
        )

    @classmethod
    def keep_all(cls, tower: TowerSpec) -> TowerKeep:
        return cls(layers=list(range(tower.num_layers)))


@dataclass
class KeepSpec:
    """Per tower ('vision', 'text'); a tower left as None is kept whole."""

    vision: TowerKeep | None = None
    text: TowerKeep | None = None

    def to_dict(self) -> dict:
        return {
            k: (None if v is None else v.to_dict()) for k, v in (("vision", self.vision), ("text", self.text))
        }

    @classmethod
    def from_dict(cls, d: dict) -> KeepSpec:
        return cls(
            **{k: (None if d.get(k) is None else TowerKeep.from_dict(d[k])) for k in ("vision", "text")}
        )


def _validated(keep: TowerKeep, tower: TowerSpec, name: str) -> TowerKeep:
    """Check indices and return a copy with sorted, explicit per-layer head/neuron lists."""
    L = tower.num_layers
    if any(b <= a for a, b in zip(keep.layers, keep.layers[1:], strict=False)) or any(
        not 0 <= i < L for i in keep.layers
    ):
        raise ValueError(f"{name}: layers must be strictly increasing indices in [0, {L}), got {keep.layers}")
    for what, units, sizes in (("heads", keep.heads, tower.heads), ("mlp", keep.mlp, tower.mlp_dims)):
        for layer, idx in units.items():
            if not 0 <= layer < L:
                raise ValueError(f"{name}: {what} given for layer {layer}, model has {L} layers")
            if len(set(idx)) != len(idx) or any(not 0 <= i < sizes[layer] for i in idx):
                raise ValueError(f"{name}: {what}[{layer}] must be distinct indices in [0, {sizes[layer]})")
    return TowerKeep(
        layers=list(keep.layers),
        heads={i: sorted(keep.heads.get(i, range(tower.heads[i]))) for i in keep.layers},
        mlp={i: sorted(keep.mlp.get(i, range(tower.mlp_dims[i]))) for i in keep.layers},
    )


def _slice_block(
    sd: dict, src: str, dst: str, heads: list[int], neurons: list[int], tower: TowerSpec
) -> dict:
    """State of one sliced block (keys renamed from block prefix src to dst)."""
    W, d = tower.width, tower.head_dim
    out = {dst + key[len(src) :]: t for key, t in sd.items() if key.startswith(src)}
    dev = out[dst + "attn.qkv.weight"].device
    hi = torch.tensor(heads, dtype=torch.long, device=dev)
    ni = torch.tensor(neurons, dtype=torch.long, device=dev)
    H, k = out[dst + "attn.qkv.weight"].shape[0] // (3 * d), len(heads)
    p = dst + "attn."
    out[p + "qkv.weight"] = out[p + "qkv.weight"].view(3, H, d, W).index_select(1, hi).reshape(3 * k * d, W)
    out[p + "qkv.bias"] = out[p + "qkv.bias"].view(3, H, d).index_select(1, hi).reshape(3 * k * d)
    out[p + "out_proj.weight"] = (
        out[p + "out_proj.weight"].view(W, H, d).index_select(1, hi).reshape(W, k * d)
    )
    p = dst + "mlp."
    out[p + "c_fc.weight"] = out[p + "c_fc.weight"].index_select(0, ni)
    out[p + "c_fc.bias"] = out[p + "c_fc.bias"].index_select(0, ni)
    out[p + "c_proj.weight"] = out[p + "c_proj.weight"].index_select(1, ni)
    return out


@torch.no_grad()
def slice_model(model: PrunableCLIP, keep: KeepSpec) -> PrunableCLIP:
    """A new dense PrunableCLIP holding only the kept units (same device/dtype; source_layers composed)."""
    spec = model.spec
    new_towers, new_state = {}, {}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    block_prefixes = tuple(f"{attr}.blocks." for attr in TOWERS.values())
    for key, t in sd.items():
        if not key.startswith(block_prefixes):
            new_state[key] = t.clone()
    for name, attr in TOWERS.items():
        tower: TowerSpec = getattr(spec, name)
        k = _validated(getattr(keep, name) or TowerKeep.keep_all(tower), tower, name)
        new_towers[name] = dataclasses.replace(
            tower,
            heads=[len(k.heads[i]) for i in k.layers],
            mlp_dims=[len(k.mlp[i]) for i in k.layers],
            source_layers=[tower.source_layers[i] for i in k.layers],
        )
        for new_i, old_i in enumerate(k.layers):
            block = _slice_block(
                sd, f"{attr}.blocks.{old_i}.", f"{attr}.blocks.{new_i}.", k.heads[old_i], k.mlp[old_i], tower
            )
            new_state.update({key: t.clone() for key, t in block.items()})
    new_spec = dataclasses.replace(spec, vision=new_towers["vision"], text=new_towers["text"])
    new_spec = CLIPSpec.from_dict(new_spec.to_dict())  # fresh, validated copy sharing no lists
    out = build_on_meta(new_spec)
    out.load_state_dict(new_state, strict=True, assign=True)
    return out.train(model.training)
