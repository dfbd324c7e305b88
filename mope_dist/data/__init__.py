"""Data: shard specs, the image-text training pipeline, labelled and retrieval eval sets, synthetic data."""

from mope_dist.data.image_text import SKIP_REASONS, ImageTextLoader, make_image_text_loader
from mope_dist.data.shards import expand_shards, shard_sizes

__all__ = ["SKIP_REASONS", "ImageTextLoader", "expand_shards", "make_image_text_loader", "shard_sizes"]
