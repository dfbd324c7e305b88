"""Scoring methods by name: the config's `mope.method` picks one from METHODS.

Every method is called alike, `METHODS[name].score(model, units, proxy, device, section)`, with the
config's `mope` section for its settings and `proxy=None` for a method that reads no data
(`needs_proxy` False). An adapter is a thin call into the engine or the baselines; a new method is
one more `@register`ed adapter. The implementations are imported when a method runs, so that config
validation and the launchers' preflight can check a name without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mope_dist.config import MopeConfig
    from mope_dist.mope.proxies import Proxy
    from mope_dist.mope.report import ScoreResult
    from mope_dist.mope.units import Unit


@dataclass(frozen=True)
class ScoringMethod:
    name: str
    score: Callable[..., ScoreResult]  # (model, units, proxy, device, section: MopeConfig)
    needs_proxy: bool  # scores from a zero-shot proxy set (mope.proxy), not from the weights alone


METHODS: dict[str, ScoringMethod] = {}


def register(name: str, needs_proxy: bool) -> Callable:
    def add(score: Callable[..., ScoreResult]) -> Callable[..., ScoreResult]:
        METHODS[name] = ScoringMethod(name, score, needs_proxy)
        return score

    return add


@register("mope", needs_proxy=True)
def _mope(model, units: list[Unit], proxy: Proxy, device, section: MopeConfig) -> ScoreResult:
    from mope_dist.mope.engine import score_mope

    return score_mope(
        model,
        units,
        proxy,
        device,
        batch_size=section.proxy.batch_size,
        candidates_per_forward=section.candidates_per_forward,
    )


@register("magnitude", needs_proxy=False)
def _magnitude(model, units: list[Unit], proxy: None, device, section: MopeConfig) -> ScoreResult:
    from mope_dist.mope.baselines import score_magnitude

    return score_magnitude(model, units)


@register("random", needs_proxy=False)
def _random(model, units: list[Unit], proxy: None, device, section: MopeConfig) -> ScoreResult:
    from mope_dist.mope.baselines import score_random

    return score_random(units, seed=section.seed)


@register("taylor", needs_proxy=True)
def _taylor(model, units: list[Unit], proxy: Proxy, device, section: MopeConfig) -> ScoreResult:
    from mope_dist.mope.baselines import score_taylor

    return score_taylor(model, units, proxy, device, batch_size=section.proxy.batch_size)
