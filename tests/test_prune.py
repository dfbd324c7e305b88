"""Plans from scores and targets: counts, rankings and allocation rules, applied to a real tiny model."""

import pytest
import torch
from conftest import tiny_open_clip

from mope_dist.config import TowerTarget
from mope_dist.errors import ConfigError
from mope_dist.model import count_params, from_open_clip, slice_model
from mope_dist.mope.units import enumerate_units
from mope_dist.prune.plan import make_plan, plan_tower


def _scores(units, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(len(units), generator=g).tolist()
    return [dict(u.to_dict(), score=s) for u, s in zip(units, values, strict=True)]


@pytest.fixture(scope="module")
def model():
    return from_open_clip(tiny_open_clip(layers=4, width=64, head_width=16)).eval()


def test_uniform_plan_keeps_top_units_and_exact_sizes(model):
    units = enumerate_units(model, neuron_groups=4)
    scores = _scores(units)
    targets = {"vision": TowerTarget(layers=2, heads=0.5, mlp=96), "text": TowerTarget(heads=3)}
    keep = make_plan(model.spec, scores, targets)

    vision_layers = [u for u in scores if u["tower"] == "vision" and u["kind"] == "layer"]
    best_two = sorted(sorted(vision_layers, key=lambda u: -u["score"])[:2], key=lambda u: u["layer"])
    assert keep.vision.layers == [u["layer"] for u in best_two]
    for layer in keep.vision.layers:
        heads = [u for u in scores if u["tower"] == "vision" and u["kind"] == "head" and u["layer"] == layer]
        expected = sorted(u["index"] for u in sorted(heads, key=lambda u: -u["score"])[:2])
        assert keep.vision.heads[layer] == expected
        assert len(keep.vision.mlp[layer]) == 96
        best_group = max(
            (u for u in scores if u["tower"] == "vision" and u["kind"] == "neurons" and u["layer"] == layer),
            key=lambda u: u["score"],
        )
        assert set(best_group["neurons"]) <= set(keep.vision.mlp[layer])
    assert keep.text.layers == [0, 1, 2, 3] and all(len(h) == 3 for h in keep.text.heads.values())
    assert keep.text.mlp == {}

    student = slice_model(model, keep)
    assert student.spec.vision.heads == [2, 2] and student.spec.vision.mlp_dims == [96, 96]
    assert student.spec.vision.source_layers == keep.vision.layers
    assert count_params(student)["total"] < count_params(model)["total"]


def test_global_allocation_keeps_budget_and_a_head_per_layer(model):
    units = enumerate_units(model, neuron_groups=4)
    scores = _scores(units, seed=1)
    # Make layer 0's heads all worse than every other head: global ranking would empty it.
    for u in scores:
        if u["kind"] == "head" and u["layer"] == 0:
            u["score"] = -10.0 - u["index"]
    vision = [u for u in scores if u["tower"] == "vision"]
    keep = plan_tower([4] * 4, [256] * 4, vision, TowerTarget(heads=2), "global", "vision")
    assert sum(len(h) for h in keep.heads.values()) == 8
    assert keep.heads[0] == [0]  # its best (least bad) head survives


def test_targets_need_scores_and_fit_the_model(model):
    units = [u for u in enumerate_units(model, neuron_groups=4) if u.kind != "layer"]
    scores = _scores(units)
    with pytest.raises(ConfigError, match="add 'layer' to mope.kinds"):
        make_plan(model.spec, scores, {"vision": TowerTarget(layers=1), "text": TowerTarget()})
    with pytest.raises(ConfigError, match="prune.text.heads: target 9 is larger than the model's 4"):
        make_plan(model.spec, scores, {"vision": TowerTarget(), "text": TowerTarget(heads=9)})


def _kept_counts(keep, spec, tower="vision"):
    """(layers, heads per kept layer, neurons per kept layer) of a TowerKeep, absent entries = all."""
    t, s = getattr(keep, tower), getattr(spec, tower)
    heads = [len(t.heads.get(i, range(s.heads[i]))) for i in t.layers]
    mlp = [len(t.mlp.get(i, range(s.mlp_dims[i]))) for i in t.layers]
    return t.layers, heads, mlp


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("groups", [3, 4, 7])  # 3 and 7 groups split 256 neurons unevenly
def test_plans_keep_exactly_the_targets(model, allocation, groups):
    """Layers, heads and MLP neurons: exactly the targeted numbers (global pools them over the kept
    layers); a neuron group is kept whole or removed, except the one cut to fit (keeping its head)."""
    units = enumerate_units(model, neuron_groups=groups)
    for seed in range(3):
        scores = _scores(units, seed=seed)
        targets = {"vision": TowerTarget(layers=3, heads=0.5, mlp=0.3), "text": TowerTarget(heads=3, mlp=100)}
        keep = make_plan(model.spec, scores, targets, allocation)
        layers, heads, mlp = _kept_counts(keep, model.spec, "vision")
        assert len(layers) == 3 and min(heads) >= 1 and min(mlp) >= 1
        assert sum(heads) == 3 * 2 and sum(mlp) == 3 * round(0.3 * 256)
        if allocation == "uniform":
            assert heads == [2, 2, 2] and mlp == [77, 77, 77]
        _, heads, mlp = _kept_counts(keep, model.spec, "text")
        assert sum(heads) == 4 * 3 and sum(mlp) == 4 * 100
        for tower in ("vision", "text"):
            t = getattr(keep, tower)
            cut = 0
            for u in scores:
                if u["tower"] != tower or u["kind"] != "neurons" or u["layer"] not in t.layers:
                    continue
                kept = [n in set(t.mlp[u["layer"]]) for n in u["neurons"]]
                if 0 < sum(kept) < len(kept):
                    cut += 1
                    assert kept == sorted(kept, reverse=True), "a cut group keeps its head"
            assert cut <= (1 if allocation == "global" else len(t.layers))


def test_ties_are_broken_by_logp_drop_and_later_rounds_rank_first(model):
    units = [u for u in enumerate_units(model, neuron_groups=4) if u.tower == "vision" and u.kind == "head"]
    g = torch.Generator().manual_seed(5)
    drops = torch.randn(len(units), generator=g).tolist()
    scores = [dict(u.to_dict(), score=0.0, logp_drop=d) for u, d in zip(units, drops, strict=True)]
    keep = plan_tower([4] * 4, [256] * 4, scores, TowerTarget(heads=2), "uniform", "vision")
    for layer in range(4):
        mine = [u for u in scores if u["layer"] == layer]
        best = sorted(sorted(mine, key=lambda u: -u["logp_drop"])[:2], key=lambda u: u["index"])
        assert keep.heads[layer] == [u["index"] for u in best]
    # a unit scored in round 2 outranks any unit scored (and removed) in round 1
    for u in scores:
        u["round"] = 2 if u["index"] in (0, 3) else 1
        u["score"] = 1.0 if u["round"] == 1 else -1.0
    keep = plan_tower([4] * 4, [256] * 4, scores, TowerTarget(heads=2), "uniform", "vision")
    assert all(keep.heads[layer] == [0, 3] for layer in range(4))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_partial_plans_remove_whole_units_and_nest(model, allocation):
    """progress < 1 removes that share of each target in whole units; plans of later steps (ranking
    the units the earlier step removed last, as iterative scoring does) keep subsets of earlier ones."""
    units = enumerate_units(model, neuron_groups=3)
    scores = _scores(units, seed=2)
    targets = {"vision": TowerTarget(layers=2, heads=1, mlp=0.25), "text": TowerTarget(mlp=0.25)}
    previous = None
    for step in (1, 2, 3):
        keep = make_plan(model.spec, scores, targets, allocation, progress=step / 3)
        layers, heads, mlp = _kept_counts(keep, model.spec)
        assert len(layers) == 4 - step * 2 // 3
        if step < 3:
            assert sum(heads) >= len(layers) * (4 - 3 * step // 3)
            for tower in ("vision", "text"):
                t = getattr(keep, tower)
                for u in scores:
                    if u["tower"] == tower and u["kind"] == "neurons" and u["layer"] in t.mlp:
                        kept = {n in set(t.mlp[u["layer"]]) for n in u["neurons"]}
                        assert len(kept) == 1, "a partial plan never cuts a group"
        else:
            assert sum(heads) == 2 and sum(mlp) == 2 * 64
        if previous is not None:
            for tower in ("vision", "text"):
                now, before = getattr(keep, tower), getattr(previous, tower)
                assert set(now.layers) <= set(before.layers)
                for layer in now.layers:
                    assert set(now.mlp.get(layer, range(256))) <= set(before.mlp.get(layer, range(256)))
                    assert set(now.heads.get(layer, range(4))) <= set(before.heads.get(layer, range(4)))
        for u in scores:  # what this step removed ranks below everything it kept
            t = getattr(keep, u["tower"])
            gone = u["layer"] not in t.layers or (
                u["kind"] == "head" and u["index"] not in t.heads.get(u["layer"], range(4))
            )
            gone = gone or (
                u["kind"] == "neurons" and u["neurons"][0] not in t.mlp.get(u["layer"], range(256))
            )
            u["round"] = u.get("round", 1) if gone else step + 1
        previous = keep


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_width_multiple_rounds_kept_mlp_widths_dropping_the_lowest_ranked(model, allocation):
    units = enumerate_units(model, neuron_groups=8)  # groups of 32 neurons (MLP width 256)
    scores = _scores(units, seed=3)
    targets = {"vision": TowerTarget(mlp=0.3), "text": TowerTarget(mlp=0.3)}  # 76.8 -> 76 neurons a layer
    exact = make_plan(model.spec, scores, targets, allocation)
    rounded = make_plan(model.spec, scores, targets, allocation, width_multiple=64)
    for tower in ("vision", "text"):
        for layer, kept in getattr(rounded, tower).mlp.items():
            assert len(kept) % 64 == 0 and len(kept) >= 64
            before = set(getattr(exact, tower).mlp[layer])
            assert before <= set(kept) or set(kept) <= before  # rounding adds or drops the lowest-ranked
    vision_total = sum(len(k) for k in rounded.vision.mlp.values())
    if allocation == "uniform":
        assert vision_total == 4 * 64  # 76 per layer rounds to the nearest multiple, 64
    student = slice_model(model, rounded)
    assert all(d % 64 == 0 for d in student.spec.vision.mlp_dims + student.spec.text.mlp_dims)
