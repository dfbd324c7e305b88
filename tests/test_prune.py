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
