"""MoPE scoring: unit inventory, zero-shot proxies, the distributed scoring engine, baselines, reports.

Typical use: `units = enumerate_units(model)`, then `result = score_mope(model, units, proxy, device)`
with a ClassificationProxy or RetrievalProxy, then `write_scores(result, out_dir)` for scores.json
and heatmaps. `python -m mope_dist.mope --config CONFIG.yaml` does the same from a recipe.
"""

from mope_dist.mope.baselines import score_magnitude, score_random, score_taylor
from mope_dist.mope.engine import score_mope
from mope_dist.mope.proxies import ClassificationProxy, RetrievalProxy, class_text_tokens
from mope_dist.mope.report import ScoreResult, read_scores, write_scores
from mope_dist.mope.units import Unit, enumerate_units

__all__ = [
    "ClassificationProxy",
    "RetrievalProxy",
    "ScoreResult",
    "Unit",
    "class_text_tokens",
    "enumerate_units",
    "read_scores",
    "score_magnitude",
    "score_mope",
    "score_random",
    "score_taylor",
    "write_scores",
]
