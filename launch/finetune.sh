#!/usr/bin/env bash
# Fine-tuning-stage compression: task teacher, then width / depth pruning + distillation in the
# stage order finetune.stages gives, then retrieval recall of every model (summary.md).
#   bash launch/finetune.sh CONFIG.yaml [section.key=value ...]
# Launcher settings come from the environment; see launch/common.sh.
source "$(dirname "$0")/common.sh"
run_launcher --module mope_dist.recipes.finetune "$@"
