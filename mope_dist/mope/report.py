"""Score results: scores.json (read by the planner), heatmap PNGs, and the same figures in TensorBoard.

scores.json schema (format "mope-dist-scores", version 2; version 1 files, without the log-probability
and round fields, are still read):
    {"format", "version", "method": "mope" | "magnitude-l1" | "magnitude-l2" | "random" | "taylor",
     "base_z": Z of the unpruned model (MoPE) or null, "base_counts": its integer counts or null,
     "base_logp": its mean log-probability of the correct class / matching pair (MoPE) or null,
     "meta": {"proxy": "classification" | "retrieval", "totals": [...], "world_size", "rounds", ...},
     "units": [{"tower": "vision" | "text", "kind": "head" | "neurons" | "layer", "layer", "index",
                "neurons": [MLP indices, importance order] | null, "params": parameters removed,
                "score": higher = more important, "z": Z without the unit (MoPE), "counts": [...] (MoPE),
                "logp": mean log-probability without the unit (MoPE), "logp_drop": the tie-breaker,
                higher = more important (MoPE), "round": the scoring round that gave these values}]}
Counts are correct predictions (classification) or hits at R@1/5/10 image->text then text->image.
With iterative scoring (rounds > 1) a unit's values come from the last round that scored it, on the
model reduced by the earlier rounds (meta["round_base_z"] lists each round's base Z); the planner
ranks later rounds first, then score, then logp_drop.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mope_dist.mope.units import KINDS, TOWERS, Unit
from mope_dist.utils import atomic_write_bytes, atomic_write_json

FORMAT = "mope-dist-scores"
_TITLES = {"head": "heads", "neurons": "neuron groups", "layer": "layers"}
VERSION = 2
_OPTIONAL = ("z", "counts", "logp", "logp_drop", "round")  # per-unit fields only some methods have


@dataclass
class ScoreResult:
    method: str
    units: list[Unit]
    scores: list[float]
    z: list[float] | None = None
    counts: list[list[int]] | None = None
    base_z: float | None = None
    base_counts: list[int] | None = None
    meta: dict = field(default_factory=dict)
    logp: list[float] | None = None
    logp_drop: list[float] | None = None
    base_logp: float | None = None
    round: list[int] | None = None  # the scoring round of each unit (iterative scoring)

    def to_dict(self) -> dict:
        records = []
        for i, (u, s) in enumerate(zip(self.units, self.scores, strict=True)):
            record = u.to_dict() | {"score": s}
            for name in _OPTIONAL:
                values = getattr(self, name)
                if values is not None:
                    record[name] = values[i]
            records.append(record)
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "base_z": self.base_z,
            "base_counts": self.base_counts,
            "base_logp": self.base_logp,
            "meta": self.meta,
            "units": records,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScoreResult:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={d.get('format')!r})")
        if d.get("version", 1) > VERSION:
            raise ValueError(
                f"scores file version {d['version']} is newer than this mope-dist reads ({VERSION})"
            )
        records = d["units"]
        optional = {
            name: [r[name] for r in records] if records and name in records[0] else None for name in _OPTIONAL
        }
        return cls(
            method=d["method"],
            units=[Unit.from_dict(r) for r in records],
            scores=[float(r["score"]) for r in records],
            base_z=d.get("base_z"),
            base_counts=d.get("base_counts"),
            base_logp=d.get("base_logp"),
            meta=d.get("meta", {}),
            **optional,
        )

    def records(self) -> list[dict]:
        """The unit records of scores.json (what the planner consumes)."""
        return self.to_dict()["units"]


def read_scores(path: str | os.PathLike) -> ScoreResult:
    return ScoreResult.from_dict(json.loads(Path(path).read_text()))


def _grid(result: ScoreResult, values: list, tower: str, kind: str):
    """Rows = layers, columns = head / group index; NaN where a (pruned) layer has fewer units."""
    import numpy as np

    cells = [
        (u.layer, u.index, np.nan if v is None else v)
        for u, v in zip(result.units, values, strict=True)
        if u.tower == tower and u.kind == kind
    ]
    if not cells:
        return None
    grid = np.full((max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1), np.nan)
    for layer, index, v in cells:
        grid[layer, index] = v
    return grid


def _panel(fig, ax, grid, kind: str, label: str) -> None:
    """A bar chart per layer (layers) or a heatmap layer x index (heads, neuron groups)."""
    import matplotlib
    import numpy as np

    layers = np.arange(grid.shape[0])
    if kind == "layer":
        ax.bar(layers, np.nan_to_num(grid[:, 0]))
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        return
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    # MoPE is negative where a removal helps Z: then a diverging map centred on 0
    norm = matplotlib.colors.TwoSlopeNorm(0.0, lo, hi) if lo < 0 < hi else None
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        cmap="viridis" if norm is None else "RdBu_r",
        norm=norm,
        interpolation="nearest",
    )
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(np.arange(grid.shape[1]))
    ax.set_yticks(layers)
    ax.set_xlabel("head" if kind == "head" else "neuron group (0 = largest magnitude)")
    ax.set_ylabel("layer")


def make_figures(result: ScoreResult) -> dict:
    """{"<tower>_<kind>": matplotlib Figure} for every tower/kind that has scores; with MoPE's
    log-probability drop, a second panel shows it beside the score (it breaks the score's ties)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score", result.scores)]
    if result.logp_drop is not None:
        panels.append(("log-probability drop (tie-breaker)", result.logp_drop))
    figures = {}
    for tower in TOWERS:
        for kind in KINDS:
            grids = [(label, _grid(result, values, tower, kind)) for label, values in panels]
            if grids[0][1] is None:
                continue
            rows, cols = grids[0][1].shape
            if kind == "layer":
                size = (max(4, 0.5 * rows + 2), 3)
            else:
                size = (max(4, 0.35 * cols + 2), max(3, 0.3 * rows + 1.5))
            fig, axes = plt.subplots(1, len(grids), figsize=(size[0] * len(grids), size[1]), squeeze=False)
            for ax, (label, grid) in zip(axes[0], grids, strict=True):
                _panel(fig, ax, grid, kind, label)
                ax.set_title(f"{result.method} {label}: {tower} {_TITLES[kind]}", fontsize=9)
            fig.tight_layout()
            figures[f"{tower}_{kind}"] = fig
    return figures


def write_scores(result: ScoreResult, out_dir: str | os.PathLike, tb_writer=None, step: int = 0) -> Path:
    """scores.json + one heatmap PNG per tower and unit kind in out_dir (atomic), and the figures in
    TensorBoard under `scores/<tower>_<kind>` when a SummaryWriter is given. Returns scores.json's path."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    path = out_dir / "scores.json"
    atomic_write_json(path, _finite(result.to_dict()))
    for name, fig in make_figures(result).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(out_dir / f"{name}.png", buf.getvalue())
        if tb_writer is not None:
            tb_writer.add_figure(f"scores/{name}", fig, global_step=step, close=False)
        plt.close(fig)
    if tb_writer is not None:
        tb_writer.flush()
    return path


def _finite(obj):
    """JSON has no NaN/inf: write them as null rather than producing an unreadable file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
