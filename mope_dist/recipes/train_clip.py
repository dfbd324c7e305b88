"""Plain contrastive CLIP pre-training with the project's trainer (no teacher, no pruning).

    bash launch/train_clip.sh CONFIG.yaml [section.key=value ...]

`teacher.name` names the architecture to start from (open_clip name or `local-dir:`; random weights
unless `teacher.pretrained` is given). The demo uses this to make the teacher it then compresses.
"""

from __future__ import annotations

import sys

from mope_dist import dist
from mope_dist.config import config_from_argv
from mope_dist.model import load_teacher
from mope_dist.recipes.builders import train_loader, zeroshot_evaluator
from mope_dist.recipes.run_dir import prepare_run_dir
from mope_dist.recipes.training import train_and_export


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
    info = dist.init_distributed(cfg.dist_timeout_s, use_deepspeed=True)
    out = prepare_run_dir(cfg)
    model, preprocess_train, preprocess_val, tokenizer = load_teacher(
        cfg.teacher.name, cfg.teacher.pretrained
    )
    data = train_loader(cfg, preprocess_train, tokenizer, info.world_size)
    evaluate = zeroshot_evaluator(cfg.eval, preprocess_val, tokenizer, info.device) if cfg.eval.data else None

    provenance = {"architecture": cfg.teacher.name, "pretrained": cfg.teacher.pretrained}
    train_and_export(model, None, data, cfg, out, info, evaluate=evaluate, provenance=provenance)
    if info.is_main:
        print(f"done: trained model {out / 'final'} (evaluations in {out / 'metrics.jsonl'})", flush=True)


if __name__ == "__main__":
    main()
