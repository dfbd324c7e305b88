#!/usr/bin/env bash
# Contrastive CLIP pre-training from scratch with the project's trainer (used by the demo for its teacher).
#   bash launch/train_clip.sh CONFIG.yaml [section.key=value ...]
# Launcher settings come from the environment; see launch/common.sh.
source "$(dirname "$0")/common.sh"
run_launcher --module mope_dist.recipes.train_clip "$@"
