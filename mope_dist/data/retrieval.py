"""Image-text retrieval sets (Flickr30k/COCO style: several captions per image) loaded into memory."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

import torch

from mope_dist.data.image_text import IMAGE_EXTS, decode_image
from mope_dist.data.shards import ShardError, check_protocols, expand_shards, iter_shard_samples
from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")


class RetrievalSet(NamedTuple):
    images: torch.Tensor  # [N, 3, H, W]
    texts: torch.Tensor  # [M, ctx] tokens
    text_to_image: torch.Tensor  # [M] index of each caption's image


def sample_captions(sample: dict) -> list[str]:
    """Captions from `json` ({"captions": [...]}, a list, or {"caption": str}), else `txt` one per line."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            meta = meta.get("captions", [meta["caption"]] if isinstance(meta.get("caption"), str) else None)
        if isinstance(meta, list):
            texts = [t.strip() for t in meta if isinstance(t, str) and t.strip()]
            if texts:
                return texts
    if "txt" in sample:
        return [t.strip() for t in sample["txt"].decode("utf-8", errors="replace").splitlines() if t.strip()]
    return []


def load_retrieval_set(
    shards,
    preprocess: Callable,
    tokenizer: Callable,
    max_images: int | None = None,
    retries: int = 3,
    retry_delay: float = 1.0,
) -> RetrievalSet:
    """Read every image of `shards` (in spec order) with its captions; images without a decodable image
    or without any caption are skipped (logged with counts)."""
    images, texts, owner = [], [], []
    skipped = {"missing_image": 0, "missing_caption": 0, "bad_image": 0, "bad_shard": 0}
    urls = [u for urls, _ in expand_shards(shards) for u in urls]
    check_protocols(urls)
    for url in urls:
        if max_images is not None and len(images) >= max_images:
            break
        try:
            for sample in iter_shard_samples(url, retries, retry_delay):
                if max_images is not None and len(images) >= max_images:
                    break
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                captions = sample_captions(sample)
                if ext is None or not captions:
                    skipped["missing_image" if ext is None else "missing_caption"] += 1
                    continue
                try:
                    image = preprocess(decode_image(sample[ext]))
                except Exception:  # undecodable image: skip it and its captions
                    skipped["bad_image"] += 1
                    continue
                owner.extend([len(images)] * len(captions))
                images.append(image)
                texts.extend(captions)
        except ShardError as exc:
            skipped["bad_shard"] += 1
            log.error("retrieval set: %s", exc)
    if sum(skipped.values()):
        log.warning("retrieval set %s: skipped %s", shards, skipped)
    if not images:
        raise ValueError(f"retrieval set {shards!r} has no usable image with captions (skipped: {skipped})")
    return RetrievalSet(torch.stack(images), tokenizer(texts), torch.tensor(owner, dtype=torch.long))
