"""Config sections -> the trainer; several trainings one after another in one process."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from mope_dist.config import Config
from mope_dist.distill.checkpoint import Mirror
from mope_dist.distill.engine import export_student, release_engine
from mope_dist.distill.trainer import TrainState, train
from mope_dist.recipes.builders import TrainData, micro_batch_size


def train_and_export(
    student,
    teacher,
    data: TrainData,
    cfg: Config,
    out: Path,
    info,
    evaluate=None,
    provenance: dict | None = None,
) -> TrainState:
    """train() with cfg's distill and deepspeed sections into `out` (no teacher: contrastive only),
    export out/final, then free the engine, so that several trainings can run one after another in
    one process (pass models nobody else holds, or they stay alive). With output.sync_url, the
    models beside the checkpoints are mirrored too: the scores (hours of work at scale), the plan and
    pruned/ (which converting a checkpoint needs) while training runs, final/ once exported."""
    url = mirror_url(cfg, out)
    models = Mirror(url, out) if url and info.is_main else None
    if models is not None:
        models.sync([name for name in ("scores", "plan.json", "pruned") if (out / name).exists()])
    try:
        result = train(
            student,
            teacher,
            data.loader,
            cfg.distill,
            cfg.deepspeed,
            micro_batch_size=micro_batch_size(cfg, info.world_size),
            output_dir=out,
            dist_info=info,
            max_skip_rate=cfg.data.max_skip_rate,
            mirror_url=url,
            evaluate=evaluate,
            normalize=data.normalize,
        )
        export_student(
            result.engine, out / "final", provenance={**(provenance or {}), "steps": result.state.step}
        )
        if models is not None:
            models.sync(["final"])
    finally:
        if models is not None:
            models.close()
    release_engine(result.engine)
    state = result.state
    del result, student, teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return state


def mirror_url(cfg: Config, out: Path) -> str | None:
    """output.sync_url for a training in `out`: under the URL the same layout as under output.dir, so
    fine-tuning's teacher and stages each mirror to their own sub-path instead of one shared root."""
    if not cfg.output.sync_url:
        return None
    sub = Path(out).resolve().relative_to(Path(cfg.output.dir).resolve()).as_posix()
    return cfg.output.sync_url.rstrip("/") + ("" if sub == "." else f"/{sub}")
