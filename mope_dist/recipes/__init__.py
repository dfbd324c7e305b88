"""The entry points and the wiring they share, kept apart from the library (as open_clip_train is
from open_clip): the library packages never import this package.

Entry points (each `CONFIG.yaml [section.key=value ...]`; the launchers in launch/ run the first three):
  pretrain    score -> one-shot prune -> distill (pre-training-stage compression)
  finetune    task teacher -> staged prune + distill -> retrieval summary (fine-tuning stage)
  train_clip  plain contrastive CLIP training with the same trainer
  score       scores only (`python -m mope_dist.recipes.score --config CONFIG.yaml`)
  preflight   the launchers' checks before any process starts (no torch)
Shared wiring, by concern: run_dir (the output.dir rule), builders (loaders, proxy set, evaluators),
phases (score and prune), training (config -> trainer); eval_cli is the tools' argparse plumbing.
"""
