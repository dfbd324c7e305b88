"""Turn unit scores and size targets into a KeepSpec: which layers, heads and neurons survive.

Higher score = more important (MoPE: the zero-shot drop when the unit is removed). Targets are per
tower: an int is an absolute count (layers kept, heads per layer, MLP width per layer), a float in
(0, 1] a keep-ratio, None keeps everything. `uniform` keeps the same count in every kept layer;
`global` ranks heads (and neuron groups) across the kept layers under the same total budget, and
still keeps at least one head and one neuron group per layer.

`check_plan` refuses a plan (computed, or a plan.json edited by hand) that keeps no layer of a tower,
or no head or no MLP neuron of a kept layer, with a one-line ConfigError before any slicing.
"""

from __future__ import annotations

from collections import defaultdict

from mope_dist.config import TowerTarget
from mope_dist.errors import ConfigError
from mope_dist.model import KeepSpec, TowerKeep

TOWERS = ("vision", "text")


def resolve_count(target: int | float | None, full: int, key: str) -> int:
    """Absolute count, keep-ratio or None -> number of units kept out of `full`."""
    if target is None:
        return full
    if isinstance(target, float):
        return max(1, round(target * full))
    if target > full:
        raise ConfigError(f"{key}: target {target} is larger than the model's {full}")
    return target


def _ranked(units: list[dict]) -> list[dict]:
    """Most important first; ties broken by position so plans are deterministic."""
    return sorted(units, key=lambda u: (-u["score"], u["layer"], u["index"]))


def _require(units: list[dict], tower: str, kind: str) -> list[dict]:
    if not units:
        raise ConfigError(
            f"prune.{tower}: a target needs {kind} scores for the {tower} tower; add {kind!r} to mope.kinds"
        )
    return units


def plan_tower(
    heads: list[int],
    mlp_dims: list[int],
    scores: list[dict],
    target: TowerTarget,
    allocation: str,
    tower: str,
) -> TowerKeep:
    """Plan one tower; `heads`/`mlp_dims` are the current per-layer sizes, `scores` its unit records."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for unit in scores:
        by_kind[unit["kind"]].append(unit)
    num_layers = len(heads)

    n_layers = resolve_count(target.layers, num_layers, f"prune.{tower}.layers")
    if n_layers < num_layers:
        ranked = _ranked(_require(by_kind["layer"], tower, "layer"))
        layers = sorted(u["layer"] for u in ranked[:n_layers])
    else:
        layers = list(range(num_layers))

    keep_heads: dict[int, list[int]] = {}
    if target.heads is not None:
        head_units = [u for u in _require(by_kind["head"], tower, "head") if u["layer"] in layers]
        budget = {i: resolve_count(target.heads, heads[i], f"prune.{tower}.heads") for i in layers}
        chosen = _allocate(head_units, budget, allocation, size=lambda u: 1)
        keep_heads = {i: sorted(u["index"] for u in chosen[i]) for i in layers if budget[i] < heads[i]}

    keep_mlp: dict[int, list[int]] = {}
    if target.mlp is not None:
        group_units = [u for u in _require(by_kind["neurons"], tower, "neurons") if u["layer"] in layers]
        budget = {i: resolve_count(target.mlp, mlp_dims[i], f"prune.{tower}.mlp") for i in layers}
        chosen = _allocate(group_units, budget, allocation, size=lambda u: len(u["neurons"]))
        for i in layers:
            if budget[i] >= mlp_dims[i]:
                continue
            # Whole groups in rank order; the last group is cut to fit (its neurons are stored in
            # importance order by the scorer), so the width is exactly the target.
            neurons = [n for u in chosen[i] for n in u["neurons"]]
            keep_mlp[i] = sorted(neurons[: budget[i]] if allocation == "uniform" else neurons)
    return TowerKeep(layers=layers, heads=keep_heads, mlp=keep_mlp)


def _allocate(units: list[dict], budget: dict[int, int], allocation: str, size) -> dict[int, list[dict]]:
    """Pick units per layer, best first: per-layer budgets (uniform) or one pooled budget (global)."""
    chosen: dict[int, list[dict]] = {layer: [] for layer in budget}
    ranked = _ranked(units)
    if allocation == "uniform":
        filled = dict.fromkeys(budget, 0)
        for unit in ranked:
            layer = unit["layer"]
            if filled[layer] < budget[layer]:
                chosen[layer].append(unit)
                filled[layer] += size(unit)
        return chosen
    remaining = sum(budget.values())
    for unit in ranked:  # the best unit of every layer first: no layer is emptied
        if not chosen[unit["layer"]]:
            chosen[unit["layer"]].append(unit)
            remaining -= size(unit)
    for unit in ranked:
        if remaining <= 0:
            break
        if unit not in chosen[unit["layer"]]:
            chosen[unit["layer"]].append(unit)
            remaining -= size(unit)
    return chosen


def check_plan(keep: KeepSpec, spec) -> None:
    """ConfigError unless every tower keeps a layer and every kept layer keeps a head and a neuron."""
    for tower in TOWERS:
        t = getattr(keep, tower)
        if t is None:
            continue
        if not t.layers:
            raise ConfigError(f"plan for the {tower} tower keeps no layer (prune.{tower}.layers)")
        num_layers = getattr(spec, tower).num_layers
        for what, units in (("head", t.heads), ("MLP neuron", t.mlp)):
            for layer, kept in units.items():
                if layer in t.layers and not kept:
                    raise ConfigError(
                        f"plan removes every {what} of {tower} layer {layer} (of {num_layers}); keep at "
                        f"least one, or remove the whole layer (prune.{tower}.layers)"
                    )


def make_plan(
    spec, scores: list[dict], targets: dict[str, TowerTarget], allocation: str = "uniform"
) -> KeepSpec:
    """Plan both towers of a model with spec `spec` (a CLIPSpec) from scores.json unit records."""
    towers = {}
    for tower in TOWERS:
        tower_spec = getattr(spec, tower)
        towers[tower] = plan_tower(
            list(tower_spec.heads),
            list(tower_spec.mlp_dims),
            [u for u in scores if u["tower"] == tower],
            targets[tower],
            allocation,
            tower,
        )
    keep = KeepSpec(**towers)
    check_plan(keep, spec)
    return keep
