"""Image-text retrieval sets (Flickr30k/COCO style: several captions per image) loaded into memory."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch

from mope_dist.data.samples import SkipCounters, captions_of, decode_image, image_of, read_shards, usable
from mope_dist.data.shards import check_protocols, expand_shards
from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")


class RetrievalSet(NamedTuple):
    images: torch.Tensor  # [N, 3, H, W]
    texts: torch.Tensor  # [M, ctx] tokens
    text_to_image: torch.Tensor  # [M] index of each caption's image


def load_retrieval_set(
    shards,
    preprocess: Callable,
    tokenizer: Callable,
    max_images: int | None = None,
    retries: int = 3,
    retry_delay: float = 1.0,
) -> RetrievalSet:
    """Read every image of `shards` (in spec order) with its captions (`json` {"captions": [...]}, a list
    or {"caption": str}, else `txt` one per line); images without a decodable image or without any
    caption are skipped (logged with counts)."""
    counters = SkipCounters()
    urls = [u for urls, _ in expand_shards(shards) for u in urls]
    check_protocols(urls)

    def convert(sample: dict):
        image, texts = image_of(sample), captions_of(sample)
        return preprocess(decode_image(image)), texts

    images, texts, owner = [], [], []
    pairs = usable(read_shards(urls, counters, retries, retry_delay), convert, counters)
    for image, captions_of_image in itertools.islice(pairs, max_images):
        owner.extend([len(images)] * len(captions_of_image))
        images.append(image)
        texts.extend(captions_of_image)
    skipped = {k: v for k, v in counters.as_dict().items() if v}
    if skipped:
        log.warning("retrieval set %s: skipped %s", shards, skipped)
    if not images:
        raise ValueError(f"retrieval set {shards!r} has no usable image with captions (skipped: {skipped})")
    return RetrievalSet(torch.stack(images), tokenizer(texts), torch.tensor(owner, dtype=torch.long))
