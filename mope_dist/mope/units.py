"""The inventory of prunable units: attention heads, FFN neuron groups and whole layers of each tower.

FFN neurons are scored in groups (scoring every neuron of a ViT-L would take ~100k forwards). By
default a layer's neurons are ranked by a cheap magnitude proxy, |W_fc[i, :]|_2 * |W_proj[:, i]|_2, and
the ranking is cut into `neuron_groups` consecutive groups, so each group holds neurons of similar
magnitude and removing one tests a coherent slice (group 0 the largest). Inside a group the neurons
stay in that order, so a planner that needs part of a group keeps its head. `grouping="contiguous"`
uses index order instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mope_dist.model import KeepSpec, TowerKeep

TOWERS = ("vision", "text")
KINDS = ("head", "neurons", "layer")
DEFAULT_NEURON_GROUPS = 16


@dataclass(frozen=True)
class Unit:
    """One removable module. `index` is the head or group index (0 for a layer); `neurons` lists a
    group's MLP hidden indices; `params` is the number of parameters its removal deletes."""

    tower: str
    kind: str
    layer: int
    index: int = 0
    neurons: tuple[int, ...] = ()
    params: int = 0

    @property
    def name(self) -> str:
        return f"{self.tower}.{self.layer}.{self.kind}" + ("" if self.kind == "layer" else f".{self.index}")

    def to_dict(self) -> dict:
        return {
            "tower": self.tower,
            "kind": self.kind,
            "layer": self.layer,
            "index": self.index,
            "neurons": list(self.neurons) if self.kind == "neurons" else None,
            "params": self.params,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        neurons = tuple(d.get("neurons") or ())
        return cls(d["tower"], d["kind"], int(d["layer"]), int(d["index"]), neurons, int(d.get("params", 0)))


def tower_of(model, tower: str):
    """The tower module of a PrunableCLIP by its name in the unit inventory."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    return model.visual if tower == "vision" else model.text


def neuron_order(block, grouping: str = "magnitude") -> torch.Tensor:
    """The order in which a block's MLP neurons are cut into groups (see the module docstring)."""
    n = block.mlp_dim
    if grouping == "contiguous":
        return torch.arange(n)
    if grouping != "magnitude":
        raise ValueError(f"grouping must be 'magnitude' or 'contiguous', got {grouping!r}")
    w_in = block.mlp.c_fc.weight.detach().float().norm(dim=1)
    w_out = block.mlp.c_proj.weight.detach().float().norm(dim=0)
    return torch.sort(w_in * w_out, descending=True, stable=True).indices.cpu()


def _head_params(block) -> int:
    w, d = block.ln_1.normalized_shape[0], block.attn.head_dim
    return 3 * d * (w + 1) + w * d  # q/k/v rows (with bias) + out-projection columns


def _neuron_params(block, count: int) -> int:
    w = block.ln_2.normalized_shape[0]
    return count * (w + 1) + w * count  # c_fc rows (with bias) + c_proj columns


def enumerate_units(
    model,
    towers: Sequence[str] = TOWERS,
    kinds: Sequence[str] = KINDS,
    neuron_groups: int = DEFAULT_NEURON_GROUPS,
    grouping: str = "magnitude",
) -> list[Unit]:
    """Every unit of the chosen kinds in the chosen towers, ordered by tower, layer, kind, index.

    Width and depth scores on a teacher: all kinds; depth only on a width-pruned model: kinds=("layer",).
    A layer with fewer neurons than `neuron_groups` gets one group per neuron.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unit kind must be one of {KINDS}, got {kind!r}")
    if neuron_groups < 1:
        raise ValueError(f"neuron_groups must be >= 1, got {neuron_groups}")
    units = []
    for tower in towers:
        for layer, block in enumerate(tower_of(model, tower).blocks):
            if "head" in kinds:
                units += [
                    Unit(tower, "head", layer, h, params=_head_params(block)) for h in range(block.num_heads)
                ]
            if "neurons" in kinds and block.mlp_dim:
                groups = torch.tensor_split(neuron_order(block, grouping), min(neuron_groups, block.mlp_dim))
                units += [
                    Unit(tower, "neurons", layer, g, tuple(idx.tolist()), _neuron_params(block, len(idx)))
                    for g, idx in enumerate(groups)
                ]
            if "layer" in kinds:
                units.append(Unit(tower, "layer", layer, params=sum(p.numel() for p in block.parameters())))
    return units


def check_units(model, units: Sequence[Unit]) -> None:
    """Fail early, naming the unit, if a unit does not exist in `model` (e.g. scores of another model)."""
    for u in units:
        blocks = tower_of(model, u.tower).blocks
        if not 0 <= u.layer < len(blocks):
            raise ValueError(f"unit {u.name}: the {u.tower} tower has {len(blocks)} layers")
        block = blocks[u.layer]
        if u.kind == "head" and not 0 <= u.index < block.num_heads:
            raise ValueError(f"unit {u.name}: layer {u.layer} has {block.num_heads} heads")
        if u.kind == "neurons" and (not u.neurons or max(u.neurons) >= block.mlp_dim or min(u.neurons) < 0):
            raise ValueError(f"unit {u.name}: neuron indices outside [0, {block.mlp_dim})")
        if u.kind not in KINDS:
            raise ValueError(f"unit {u.name}: unknown kind {u.kind!r}")


def keep_without(model, unit: Unit) -> KeepSpec:
    """The KeepSpec of `model` minus `unit` (everything else kept), for physical slicing."""
    block = tower_of(model, unit.tower).blocks[unit.layer]
    keep = TowerKeep(layers=list(range(len(tower_of(model, unit.tower).blocks))))
    if unit.kind == "layer":
        keep.layers.remove(unit.layer)
    elif unit.kind == "head":
        keep.heads[unit.layer] = [h for h in range(block.num_heads) if h != unit.index]
    else:
        removed = set(unit.neurons)
        keep.mlp[unit.layer] = [i for i in range(block.mlp_dim) if i not in removed]
    return KeepSpec(**{unit.tower: keep})
