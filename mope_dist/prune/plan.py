"""Turn unit scores and size targets into a KeepSpec: which layers, heads and neurons survive.

Higher score = more important (MoPE: the zero-shot drop when the unit is removed); equal scores are
ordered by `logp_drop` (MoPE's continuous tie-breaker), and units of a later scoring round (iterative
scoring, mope_dist.prune.rounds) rank before those removed in earlier rounds. Targets are per tower:
an int is an absolute count (layers kept, heads per layer, MLP width per layer), a float in (0, 1] a
keep-ratio, None keeps everything. `uniform` keeps the same count in every kept layer; `global`
ranks heads (and neuron groups) across the kept layers under the same total budget, and still keeps
at least one head and one neuron per layer. Both keep exactly the targeted number of neurons: the
neuron group that crosses the budget is cut to fit (its neurons are stored in importance order, so
its head is kept). A partial plan (`progress` < 1, a step of iterative scoring) removes that fraction
of each target in whole units only, never cutting a group.

`check_plan` refuses a plan (computed, or a plan.json edited by hand) that keeps no layer of a tower,
or no head or no MLP neuron of a kept layer, with a one-line ConfigError before any slicing.
"""

from __future__ import annotations

import math
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


def _partial(full: int, final: int, progress: float) -> int:
    """Units kept after `progress` (in (0, 1]) of the way from `full` to `final`, rounded towards keeping."""
    return full - math.floor(progress * (full - final) + 1e-9)


def _ranked(units: list[dict]) -> list[dict]:
    """Most important first: later scoring round, then score, then logp_drop; remaining ties broken
    by position so plans are deterministic."""
    return sorted(
        units,
        key=lambda u: (
            -(u.get("round") or 1),
            -u["score"],
            -(u.get("logp_drop") or 0.0),
            u["layer"],
            u["index"],
        ),
    )


def _require(units: list[dict], tower: str, kind: str) -> list[dict]:
    if not units:
        raise ConfigError(
            f"prune.{tower}: a target needs {kind} scores for the {tower} tower; add {kind!r} to "
            f"mope.kinds and {tower!r} to mope.towers"
        )
    return units


def plan_tower(
    heads: list[int],
    mlp_dims: list[int],
    scores: list[dict],
    target: TowerTarget,
    allocation: str,
    tower: str,
    progress: float = 1.0,
    width_multiple: int = 1,
) -> TowerKeep:
    """Plan one tower; `heads`/`mlp_dims` are the current per-layer sizes, `scores` its unit records.
    `width_multiple`: kept MLP widths are multiples of it (or the full width), which tensor cores run
    at full speed: each layer's planned width is rounded to the nearest multiple (at least one),
    keeping or adding neurons in the layer's ranking order."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for unit in scores:
        by_kind[unit["kind"]].append(unit)
    num_layers = len(heads)
    whole = progress < 1

    def count(value, full: int, key: str) -> int:
        return _partial(full, resolve_count(value, full, key), progress)

    n_layers = count(target.layers, num_layers, f"prune.{tower}.layers")
    if n_layers < num_layers:
        ranked = _ranked(_require(by_kind["layer"], tower, "layer"))
        layers = sorted(u["layer"] for u in ranked[:n_layers])
    else:
        layers = list(range(num_layers))

    keep_heads: dict[int, list[int]] = {}
    if target.heads is not None:
        head_units = [u for u in _require(by_kind["head"], tower, "head") if u["layer"] in layers]
        budget = {i: count(target.heads, heads[i], f"prune.{tower}.heads") for i in layers}
        chosen = _allocate(head_units, budget, allocation, lambda u: 1, whole)
        kept = {i: sorted(u["index"] for u, _ in chosen[i]) for i in layers}
        keep_heads = {i: kept[i] for i in layers if len(kept[i]) < heads[i]}

    keep_mlp: dict[int, list[int]] = {}
    if target.mlp is not None:
        group_units = [u for u in _require(by_kind["neurons"], tower, "neurons") if u["layer"] in layers]
        budget = {i: count(target.mlp, mlp_dims[i], f"prune.{tower}.mlp") for i in layers}
        chosen = _allocate(group_units, budget, allocation, lambda u: len(u["neurons"]), whole)
        kept = {i: sorted(n for u, take in chosen[i] for n in u["neurons"][:take]) for i in layers}
        if width_multiple > 1:  # the chosen neurons are a best-first prefix of each layer's ranking
            m = width_multiple
            width = {i: min(mlp_dims[i], max(m, m * round(len(kept[i]) / m))) for i in layers}
            order = {
                i: [n for u in _ranked(group_units) if u["layer"] == i for n in u["neurons"]] for i in layers
            }
            kept = {i: sorted(order[i][: width[i]]) for i in layers}
        keep_mlp = {i: kept[i] for i in layers if len(kept[i]) < mlp_dims[i]}
    return TowerKeep(layers=layers, heads=keep_heads, mlp=keep_mlp)


def _allocate(
    units: list[dict], budget: dict[int, int], allocation: str, size, whole: bool
) -> dict[int, list[tuple[dict, int]]]:
    """Pick units best first, per layer (uniform) or under one pooled budget (global, where every
    layer first gets part of its best unit, so none is emptied). Returns per layer the chosen units
    with how many of their elements are kept: all, except the unit crossing the budget, which is cut
    to fit; with `whole` it is kept whole (the budget is exceeded by less than one unit)."""
    chosen: dict[int, list[tuple[dict, int]]] = {layer: [] for layer in budget}
    ranked = _ranked(units)

    def take(unit: dict, left: int) -> int:
        return size(unit) if whole else min(size(unit), left)

    if allocation == "uniform":
        left = dict(budget)
        for unit in ranked:
            layer = unit["layer"]
            if left[layer] > 0:
                n = take(unit, left[layer])
                chosen[layer].append((unit, n))
                left[layer] -= n
        return chosen
    left = sum(budget.values())
    best = {}
    for unit in ranked:
        best.setdefault(unit["layer"], unit)
    waiting = len(best)
    for layer, unit in best.items():  # leave at least one element for every layer still waiting
        waiting -= 1
        n = take(unit, left - waiting)
        chosen[layer].append((unit, n))
        left -= n
    for unit in ranked:
        if left <= 0:
            break
        if best[unit["layer"]] is not unit:
            n = take(unit, left)
            chosen[unit["layer"]].append((unit, n))
            left -= n
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
    spec,
    scores: list[dict],
    targets: dict[str, TowerTarget],
    allocation: str = "uniform",
    progress: float = 1.0,
    width_multiple: int = 1,
) -> KeepSpec:
    """Plan both towers of a model with spec `spec` (a CLIPSpec) from scores.json unit records;
    `progress` < 1 applies only that fraction of each target's removal (see the module docstring)."""
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
            progress,
            width_multiple,
        )
    keep = KeepSpec(**towers)
    check_plan(keep, spec)
    return keep
