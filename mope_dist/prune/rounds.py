"""Iterative scoring: remove each target's lowest units in R steps, re-scoring what remains each round.

One-shot scores measure each unit with every other unit present, so two units that can stand in for
each other both look unimportant and a one-shot plan removes both. In R rounds, round r scores the
remaining units on the model reduced by rounds 1..r-1 and removes r/R of each target's removal (in
whole units: a partial plan never cuts a neuron group); the final plan, made from the result with
make_plan like a one-shot plan, keeps exactly the targets.

The reduced model is the teacher physically sliced (mope_dist.model.slice_model: the same outputs as
masking the removed units, and cheaper), and the remaining units are mapped onto it, so the scorer
(the MoPE engine with its prefix caching and batched candidates, or any baseline) runs unchanged.
Each unit keeps the values of the last round that scored it and that round's number; the planner
ranks later rounds first, so the units removed in round r rank below every unit still present then,
and make_plan on the combined records reproduces every round's removals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mope_dist.config import TowerTarget
from mope_dist.model import KeepSpec, slice_model
from mope_dist.mope.report import ScoreResult
from mope_dist.mope.units import Unit
from mope_dist.prune.plan import make_plan

Scorer = Callable[[object, list[Unit]], ScoreResult]  # (model, its units) -> their scores
_PER_UNIT = {"score": "scores", "z": "z", "counts": "counts", "logp": "logp", "logp_drop": "logp_drop"}


def _index_map(keep: KeepSpec, model, unit: Unit) -> Unit | None:
    """`unit` of `model` as a unit of slice_model(model, keep), or None if the plan removed it."""
    tower_keep = getattr(keep, unit.tower)
    if tower_keep is None:
        return unit
    if unit.layer not in tower_keep.layers:
        return None
    layer = tower_keep.layers.index(unit.layer)
    if unit.kind == "head" and unit.layer in tower_keep.heads:
        heads = tower_keep.heads[unit.layer]
        if unit.index not in heads:
            return None
        return Unit(unit.tower, "head", layer, heads.index(unit.index), params=unit.params)
    if unit.kind == "neurons" and unit.layer in tower_keep.mlp:
        position = {n: i for i, n in enumerate(tower_keep.mlp[unit.layer])}
        if not all(n in position for n in unit.neurons):
            return None  # partial plans remove whole groups only
        neurons = tuple(position[n] for n in unit.neurons)
        return Unit(unit.tower, "neurons", layer, unit.index, neurons, unit.params)
    return Unit(unit.tower, unit.kind, layer, unit.index, unit.neurons, unit.params)


def score_in_rounds(
    model,
    units: Sequence[Unit],
    score: Scorer,
    targets: dict[str, TowerTarget],
    allocation: str = "uniform",
    rounds: int = 1,
) -> ScoreResult:
    """Scores of `units` of `model` in `rounds` rounds towards `targets` (rounds=1: score(model, units)).

    The result lists every unit once, with its last round's values in `round`; make_plan(model.spec,
    result.records(), targets, allocation) is the final plan. meta["round_base_z"] holds each round's
    base Z (MoPE) and meta["round_units"] how many units each round scored.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    units = list(units)
    if units:  # the targets can be met from these units: a missing kind fails now, not after scoring
        make_plan(model.spec, [u.to_dict() | {"score": 0.0} for u in units], targets, allocation)
    if rounds == 1 or not units:
        return score(model, units)
    values: dict[Unit, dict] = {}  # unit -> its scores.json fields from the last round that scored it
    first: ScoreResult | None = None
    round_base_z, round_units = [], []
    keep = KeepSpec()
    for r in range(1, rounds + 1):
        present = [(u, _index_map(keep, model, u)) for u in units]
        present = [(u, mapped) for u, mapped in present if mapped is not None]
        reduced = model if r == 1 else slice_model(model, keep)
        result = score(reduced, [mapped for _, mapped in present])
        first = first or result
        round_base_z.append(result.base_z)
        round_units.append(len(present))
        fields = {key: getattr(result, attr) for key, attr in _PER_UNIT.items()}
        for i, (u, _) in enumerate(present):
            values[u] = {key: v[i] for key, v in fields.items() if v is not None} | {"round": r}
        if r < rounds:
            records = [u.to_dict() | values[u] for u in units]
            keep = make_plan(model.spec, records, targets, allocation, progress=r / rounds)
    per_unit = {
        attr: [values[u][key] for u in units] if key in values[units[0]] else None
        for key, attr in _PER_UNIT.items()
    }
    return ScoreResult(
        method=first.method,
        units=units,
        **per_unit,
        round=[values[u]["round"] for u in units],
        base_z=first.base_z,
        base_counts=first.base_counts,
        base_logp=first.base_logp,
        meta=first.meta | {"rounds": rounds, "round_base_z": round_base_z, "round_units": round_units},
    )
