#!/usr/bin/env bash
# Pre-training-stage compression in one job: MoPE scores -> one-shot width+depth pruning -> distillation.
#   bash launch/pretrain.sh CONFIG.yaml [section.key=value ...]
# Launcher settings come from the environment; see launch/common.sh.
source "$(dirname "$0")/common.sh"
run_launcher --module mope_dist.recipes.pretrain "$@"
