"""MoPE scoring: unit inventory, zero-shot proxies, the distributed scoring engine, baselines, reports.

Typical use: `units = enumerate_units(model)`, then `result = score_mope(model, units, proxy, device)`
with a ClassificationProxy or RetrievalProxy, then `write_scores(result, out_dir)` for scores.json
and heatmaps. `python -m mope_dist.recipes.score --config CONFIG.yaml` does the same from a recipe,
with the method named by `mope.method` (mope_dist.mope.methods).

The names below are imported on first use, so that importing the light `methods` registry (config
validation does) does not import torch.
"""

import importlib

_EXPORTS = {
    "ClassificationProxy": "proxies",
    "RetrievalProxy": "proxies",
    "class_text_tokens": "proxies",
    "ScoreResult": "report",
    "read_scores": "report",
    "write_scores": "report",
    "Unit": "units",
    "enumerate_units": "units",
    "score_mope": "engine",
    "score_magnitude": "baselines",
    "score_random": "baselines",
    "score_taylor": "baselines",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mope_dist.mope.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mope_dist.mope' has no attribute {name!r}")
