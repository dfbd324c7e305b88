"""Iterative scoring (mope.rounds): bookkeeping against one-shot scores and a slice-and-evaluate
reference, the exact final plan, and the case it exists for (units that only matter together)."""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_open_clip  # noqa: E402
from test_mope import GROUPS, make_proxies, scoring_model  # noqa: E402

from mope_dist.config import TowerTarget  # noqa: E402
from mope_dist.errors import ConfigError  # noqa: E402
from mope_dist.model import KeepSpec, from_open_clip, slice_model  # noqa: E402
from mope_dist.mope.engine import score_mope  # noqa: E402
from mope_dist.mope.proxies import z_from_counts  # noqa: E402
from mope_dist.mope.reference import proxy_counts  # noqa: E402
from mope_dist.mope.report import ScoreResult, read_scores, write_scores  # noqa: E402
from mope_dist.mope.units import enumerate_units  # noqa: E402
from mope_dist.prune.plan import make_plan  # noqa: E402
from mope_dist.prune.rounds import score_in_rounds  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def without(keep: KeepSpec, spec, unit) -> KeepSpec:
    """`keep` (indices of the teacher) with one more teacher unit removed."""
    keep = copy.deepcopy(keep)
    t, s = getattr(keep, unit.tower), getattr(spec, unit.tower)
    if unit.kind == "layer":
        t.layers.remove(unit.layer)
    elif unit.kind == "head":
        t.heads[unit.layer] = [
            h for h in t.heads.get(unit.layer, range(s.heads[unit.layer])) if h != unit.index
        ]
    else:
        kept = t.mlp.get(unit.layer, range(s.mlp_dims[unit.layer]))
        t.mlp[unit.layer] = [n for n in kept if n not in set(unit.neurons)]
    return keep


def test_rounds_match_one_shot_then_slice_and_evaluate(tmp_path):
    """Round 1 is the one-shot engine; round 2's counts of each remaining unit equal evaluating the
    teacher with round 1's removals and that unit sliced out; the final plan keeps exactly the targets
    and none of round 1's removals, also when made from scores.json read back."""
    model = scoring_model()
    cls, _ = make_proxies(model)
    units = enumerate_units(model, neuron_groups=GROUPS)
    targets = {"vision": TowerTarget(heads=2, mlp=0.5), "text": TowerTarget(layers=1, heads=1)}
    score = partial(score_mope, proxy=cls, batch_size=8, candidates_per_forward=4, progress=False)
    result = score_in_rounds(model, units, score, targets, "uniform", rounds=2)

    one_shot = score(model, units)
    first = make_plan(model.spec, one_shot.records(), targets, "uniform", progress=0.5)
    assert result.meta["rounds"] == 2 and result.base_z == one_shot.base_z
    assert (
        result.meta["round_base_z"][1]
        == z_from_counts(torch.tensor([proxy_counts(slice_model(model, first), cls)]), cls.totals()).item()
    )
    in_round = {1: 0, 2: 0}
    for i, u in enumerate(units):
        in_round[result.round[i]] += 1
        if result.round[i] == 1:  # removed by round 1: its one-shot values
            assert (result.scores[i], result.counts[i]) == (one_shot.scores[i], one_shot.counts[i])
            assert result.logp_drop[i] == one_shot.logp_drop[i]
        else:
            assert result.counts[i] == proxy_counts(slice_model(model, without(first, model.spec, u)), cls), u
    assert in_round[1] == 2 + 2 + 2  # per layer: a vision head, a vision neuron group, a text head
    assert result.meta["round_units"] == [len(units), in_round[2]]

    final = make_plan(model.spec, result.records(), targets, "uniform")
    assert [len(final.vision.heads[i]) for i in (0, 1)] == [2, 2]
    assert [len(final.vision.mlp[i]) for i in (0, 1)] == [128, 128]
    assert len(final.text.layers) == 1 and len(final.text.heads[final.text.layers[0]]) == 1
    for i, u in enumerate(units):
        if result.round[i] == 1:
            t = getattr(final, u.tower)
            assert (
                u.layer not in t.layers
                or (u.kind == "head" and u.index not in t.heads[u.layer])
                or (u.kind == "neurons" and not set(u.neurons) & set(t.mlp[u.layer]))
            ), u
    write_scores(result, tmp_path)
    assert make_plan(model.spec, read_scores(tmp_path / "scores.json").records(), targets) == final


def test_units_that_only_matter_together_are_not_removed_together():
    """A stand-in scorer where vision heads 0 and 1 of layer 0 back each other up: removing one
    costs nothing while the other is there. One shot removes both; two rounds keep one of them."""
    model = from_open_clip(tiny_open_clip(layers=2, width=64, head_width=16)).eval()
    with torch.no_grad():  # tag each head with its teacher identity (slicing carries it along)
        for layer, block in enumerate(model.visual.blocks):
            block.attn.qkv.bias.view(3, 4, 16)[0] = (10 * layer + torch.arange(4.0))[:, None]

    def score(reduced, units) -> ScoreResult:
        def tag(u):
            return int(reduced.visual.blocks[u.layer].attn.qkv.bias.view(3, -1, 16)[0, u.index, 0])

        present = {tag(u) for u in units}
        scores = [(1.0 if {0, 1} - {tag(u)} - present else 0.0) if tag(u) in (0, 1) else 0.5 for u in units]
        return ScoreResult(method="stand-in", units=units, scores=scores)

    units = enumerate_units(model, towers=["vision"], kinds=["head"])
    targets = {"vision": TowerTarget(heads=2), "text": TowerTarget()}
    one_shot = make_plan(model.spec, score_in_rounds(model, units, score, targets).records(), targets)
    assert one_shot.vision.heads[0] == [2, 3]
    iterative = make_plan(
        model.spec, score_in_rounds(model, units, score, targets, rounds=2).records(), targets
    )
    assert len(iterative.vision.heads[0]) == 2 and len({0, 1} & set(iterative.vision.heads[0])) == 1


def test_targets_the_units_cannot_reach_fail_before_any_scoring():
    model = from_open_clip(tiny_open_clip(layers=2, width=64, head_width=16)).eval()
    units = enumerate_units(model, kinds=["head"])

    def score(reduced, us):
        raise AssertionError("scored before the targets were checked")

    targets = {"vision": TowerTarget(layers=1), "text": TowerTarget()}
    for rounds in (1, 2):  # one-shot too (the default): scoring a real teacher takes hours
        with pytest.raises(ConfigError, match="add 'layer' to mope.kinds and 'vision' to mope.towers"):
            score_in_rounds(model, units, score, targets, rounds=rounds)
