"""mope-dist: MoPE-CLIP structured pruning and distillation of CLIP models at pre-training scale."""

__version__ = "0.1.0"
