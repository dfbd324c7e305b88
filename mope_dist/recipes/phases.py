"""The score and prune phases the entry points share, and the target check that runs before them.

Both phases are collective: every rank calls them, rank 0 writes the files, and all ranks agree on
the outcome (a problem is the same ConfigError everywhere, not rank 0 failing while the rest wait).
The scoring method comes from the registry in mope_dist.mope.methods.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from mope_dist import dist
from mope_dist.config import Config, TowerTarget, validate_targets
from mope_dist.errors import ConfigError
from mope_dist.model import format_counts_table, save_pretrained, slice_model
from mope_dist.mope.methods import METHODS
from mope_dist.mope.report import ScoreResult, read_scores, write_scores
from mope_dist.mope.units import enumerate_units
from mope_dist.prune.plan import make_plan
from mope_dist.prune.rounds import score_in_rounds
from mope_dist.recipes.builders import build_proxy
from mope_dist.utils import atomic_write_json, get_logger

log = get_logger("mope_dist.recipes")


def check_targets(cfg: Config, spec) -> None:
    """Absolute prune targets must fit the model; checked before any scoring work."""
    towers = {"vision": spec.vision, "text": spec.text}
    validate_targets(
        cfg,
        layers={k: t.num_layers for k, t in towers.items()},
        heads={k: min(t.heads) for k, t in towers.items()},
        mlp={k: min(t.mlp_dims) for k, t in towers.items()},
    )


def score_units(
    cfg: Config,
    model,
    preprocess,
    tokenizer,
    device,
    out_dir: Path,
    kinds=None,
    towers=None,
    tb_writer=None,
    targets: dict[str, TowerTarget] | None = None,
) -> ScoreResult:
    """Score the units of `model` (`towers`/`kinds` default to cfg.mope's) with `cfg.mope.method`, in
    `cfg.mope.rounds` rounds towards `targets` (default cfg.prune's); rank 0 writes scores.json and heatmaps."""
    m = cfg.mope
    method = METHODS[m.method]
    units = enumerate_units(model, towers or m.towers, kinds or m.kinds, m.neuron_groups)
    proxy = None
    if method.needs_proxy:
        proxy = build_proxy(m.proxy, preprocess, tokenizer)
        log.info("scoring %d units with %s on a %s proxy", len(units), m.method, m.proxy.kind)
        model = model.to(device)
    score = partial(method.score, proxy=proxy, device=device, section=m)
    targets = targets or {"vision": cfg.prune.vision, "text": cfg.prune.text}
    result = score_in_rounds(model, units, score, targets, cfg.prune.allocation, m.rounds)
    if dist.is_main():
        write_scores(result, out_dir, tb_writer=tb_writer)
    dist.barrier()
    return result


def prune_phase(
    cfg: Config,
    model,
    scores_path: Path,
    out: Path,
    targets: dict[str, TowerTarget] | None = None,
    provenance: dict | None = None,
    names: tuple[str, str] = ("teacher", "pruned"),
) -> None:
    """plan.json + pruned/ from the scores of `model` (rank 0 writes; the others wait).

    `targets` per tower default to cfg.prune's; `provenance` is added to pruned/config.json's. A plan
    the scores cannot satisfy is a ConfigError on every rank (not rank 0 failing while the rest wait)."""
    error = None
    if dist.is_main():
        try:
            result = read_scores(scores_path)
            targets = targets or {"vision": cfg.prune.vision, "text": cfg.prune.text}
            keep = make_plan(
                model.spec,
                result.to_dict()["units"],
                targets,
                cfg.prune.allocation,
                width_multiple=cfg.prune.width_multiple,
            )
        except ConfigError as e:
            error = str(e)
        else:
            student = slice_model(model, keep)
            plan = {"method": result.method, "allocation": cfg.prune.allocation, "keep": keep.to_dict()}
            atomic_write_json(out / "plan.json", plan)
            provenance = {
                "teacher": cfg.teacher.name,
                "pretrained": cfg.teacher.pretrained,
                **(provenance or {}),
                "plan": plan,
            }
            save_pretrained(student, out / "pruned", provenance=provenance)
            print(format_counts_table(model, student, names=names), flush=True)
    agreed = dist.agree_on_error(error)  # collective: also the barrier the other ranks wait at
    if agreed:
        raise ConfigError(agreed[0])
