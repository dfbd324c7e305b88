"""Score the units of a model and stop (no pruning, no training):

    python -m mope_dist.recipes.score --config CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 -m mope_dist.recipes.score --config CONFIG.yaml mope.method=taylor

Reads the `teacher`, `mope` and `output` sections. Writes OUTPUT/scores/scores.json (schema in
mope_dist/mope/report.py) with one heatmap PNG per tower and unit kind, the same figures in
OUTPUT/tensorboard, and OUTPUT/config.yaml; a later `pretrain` run with the same teacher and mope
settings reuses these scores. Under torchrun or deepspeed every rank loads the proxy set, scores its
share of it, and all ranks end with the same scores. Bad configuration: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from torch.utils.tensorboard import SummaryWriter

from mope_dist import dist
from mope_dist.config import load_config
from mope_dist.errors import ConfigError
from mope_dist.model import load_teacher
from mope_dist.mope.methods import METHODS
from mope_dist.recipes.phases import score_units
from mope_dist.recipes.run_dir import prepare_run_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mope_dist.recipes.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if METHODS[cfg.mope.method].needs_proxy and not cfg.mope.proxy.data:
            raise ConfigError(f"mope.proxy.data is required by mope.method={cfg.mope.method}")
        if not cfg.teacher.name:
            raise ConfigError("teacher.name is required")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    info = dist.init_distributed(cfg.dist_timeout_s)
    out = prepare_run_dir(cfg)
    model, _, preprocess_val, tokenizer = load_teacher(cfg.teacher.name, cfg.teacher.pretrained)
    tb = SummaryWriter(str(out / "tensorboard")) if info.is_main else None
    try:
        result = score_units(cfg, model, preprocess_val, tokenizer, info.device, out / "scores", tb_writer=tb)
    finally:
        if tb is not None:
            tb.close()
    if info.is_main:
        base = "" if result.base_z is None else f", base Z {result.base_z:.4f}"
        print(f"scored {len(result.units)} units ({result.method}{base}): {out / 'scores' / 'scores.json'}")


if __name__ == "__main__":
    main()
