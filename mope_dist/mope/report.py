"""Score results: scores.json (read by the planner), heatmap PNGs, and the same figures in TensorBoard.

scores.json schema (format "mope-dist-scores", version 1):
    {"format", "version", "method": "mope" | "magnitude-l1" | "magnitude-l2" | "random" | "taylor",
     "base_z": Z of the unpruned model (MoPE) or null, "base_counts": its integer counts or null,
     "meta": {"proxy": "classification" | "retrieval", "totals": [...], "world_size", ...},
     "units": [{"tower": "vision" | "text", "kind": "head" | "neurons" | "layer", "layer", "index",
                "neurons": [MLP indices, importance order] | null, "params": parameters removed,
                "score": higher = more important, "z": Z without the unit (MoPE), "counts": [...] (MoPE)}]}
Counts are correct predictions (classification) or hits at R@1/5/10 image->text then text->image.
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
VERSION = 1


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

    def to_dict(self) -> dict:
        records = []
        for i, (u, s) in enumerate(zip(self.units, self.scores, strict=True)):
            record = u.to_dict() | {"score": s}
            if self.z is not None:
                record["z"] = self.z[i]
            if self.counts is not None:
                record["counts"] = self.counts[i]
            records.append(record)
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "base_z": self.base_z,
            "base_counts": self.base_counts,
            "meta": self.meta,
            "units": records,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScoreResult:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format={d.get('format')!r})")
        records = d["units"]
        has_z = bool(records) and "z" in records[0]
        has_counts = bool(records) and "counts" in records[0]
        return cls(
            method=d["method"],
            units=[Unit.from_dict(r) for r in records],
            scores=[float(r["score"]) for r in records],
            z=[float(r["z"]) for r in records] if has_z else None,
            counts=[list(r["counts"]) for r in records] if has_counts else None,
            base_z=d.get("base_z"),
            base_counts=d.get("base_counts"),
            meta=d.get("meta", {}),
        )

    def records(self) -> list[dict]:
        """The unit records of scores.json (what the planner consumes)."""
        return self.to_dict()["units"]


def read_scores(path: str | os.PathLike) -> ScoreResult:
    return ScoreResult.from_dict(json.loads(Path(path).read_text()))


def _grid(result: ScoreResult, tower: str, kind: str):
    """Rows = layers, columns = head / group index; NaN where a (pruned) layer has fewer units."""
    import numpy as np

    cells = [
        (u.layer, u.index, s)
        for u, s in zip(result.units, result.scores, strict=True)
        if u.tower == tower and u.kind == kind
    ]
    if not cells:
        return None
    grid = np.full((max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1), np.nan)
    for layer, index, s in cells:
        grid[layer, index] = s
    return grid


def make_figures(result: ScoreResult) -> dict:
    """{"<tower>_<kind>": matplotlib Figure} for every tower/kind that has scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figures = {}
    for tower in TOWERS:
        for kind in KINDS:
            grid = _grid(result, tower, kind)
            if grid is None:
                continue
            title = f"{result.method} scores: {tower} {_TITLES[kind]}"
            layers = np.arange(grid.shape[0])
            if kind == "layer":
                fig, ax = plt.subplots(figsize=(max(4, 0.5 * grid.shape[0] + 2), 3))
                ax.bar(layers, np.nan_to_num(grid[:, 0]))
                ax.axhline(0, color="black", linewidth=0.5)
                ax.set_xticks(layers)
                ax.set_xlabel("layer")
                ax.set_ylabel("score")
            else:
                size = (max(4, 0.35 * grid.shape[1] + 2), max(3, 0.3 * grid.shape[0] + 1.5))
                fig, ax = plt.subplots(figsize=size)
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
                fig.colorbar(image, ax=ax, label="score")
                ax.set_xticks(np.arange(grid.shape[1]))
                ax.set_yticks(layers)
                ax.set_xlabel("head" if kind == "head" else "neuron group (0 = largest magnitude)")
                ax.set_ylabel("layer")
            ax.set_title(title)
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
