"""Data: shard specs, the image-text training pipeline, labelled and retrieval eval sets, synthetic data."""

from mope_dist.data.image_text import ImageTextLoader, make_image_text_loader
from mope_dist.data.labelled import LabelledLoader, load_classnames, load_templates, make_labelled_loader
from mope_dist.data.retrieval import RetrievalSet, load_retrieval_set
from mope_dist.data.samples import SKIP_REASONS
from mope_dist.data.shards import expand_shards, shard_sizes

__all__ = [
    "SKIP_REASONS",
    "ImageTextLoader",
    "LabelledLoader",
    "RetrievalSet",
    "expand_shards",
    "load_classnames",
    "load_retrieval_set",
    "load_templates",
    "make_image_text_loader",
    "make_labelled_loader",
    "shard_sizes",
]
