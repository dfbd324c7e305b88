"""Labelled image sets for zero-shot evaluation and the MoPE proxy, split exactly over ranks.

A source is a torchvision ImageFolder directory (one folder per class; class index = position of the
folder in sorted order, so an ImageNet val folder of 1000 wnids lines up with open_clip's
IMAGENET_CLASSNAMES) or a shard spec whose samples carry a `cls` field (class index) and an image.

Every rank builds the same deterministic list of samples (optionally at most `max_per_class` per class)
and takes every world_size-th entry starting at its rank: the parts are disjoint and their union is every
sample exactly once, with no padding (the eval code sums correct counts over ranks, so unequal part sizes
need no extra collective). Shard sources are indexed in a first pass that reads every shard on every rank;
an ImageFolder needs only a directory listing, so prefer it for large sets.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import open_clip
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mope_dist import dist
from mope_dist.data.samples import SkipCounters, decode_image, image_of, label_of, read_shards, usable
from mope_dist.data.shards import check_protocols, expand_shards
from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file {str(path)!r} is empty")
    return lines


def load_classnames(spec: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """'imagenet' (open_clip's IMAGENET_CLASSNAMES, sorted-wnid order) or a text file, one name per line."""
    names = (
        list(open_clip.IMAGENET_CLASSNAMES) if str(spec) == "imagenet" else _read_lines(spec, "classnames")
    )
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names in {str(spec)!r} but the data has {num_classes} classes")
    return names


def load_templates(spec: str | os.PathLike) -> list[Callable[[str], str]] | list[str]:
    """'openai' (80 OpenAI ImageNet prompts), 'simple', or a text file of format strings with `{}`."""
    if str(spec) == "openai":
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if str(spec) == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    templates = _read_lines(spec, "templates")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} in {str(spec)!r} has no '{{}}' placeholder for the class name")
    return templates


def _select(entries: list, labels: list[int], max_per_class: int | None, seed: int) -> list:
    """Keep at most max_per_class entries of each class, chosen by a seeded draw, in original order."""
    if max_per_class is None:
        return entries
    if max_per_class <= 0:
        raise ValueError(f"max_per_class must be > 0, got {max_per_class}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    keep = set()
    for label, idx in by_class.items():
        keep.update(
            idx if len(idx) <= max_per_class else random.Random(f"{seed}/{label}").sample(idx, max_per_class)
        )
    return [e for i, e in enumerate(entries) if i in keep]


class _FolderPart(Dataset):
    def __init__(self, entries: list[tuple[str, int]], preprocess: Callable, counters: SkipCounters):
        self.entries, self.preprocess, self.counters = entries, preprocess, counters

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        path, label = self.entries[i]
        try:
            with open(path, "rb") as f:
                return self.preprocess(decode_image(f.read())), label
        except Exception as exc:  # a broken file is skipped and counted, not fatal
            self.counters.add("bad_image")
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None


class _ShardPart(IterableDataset):
    """This rank's samples of a shard set: a webdataset pipeline over the shards holding them, split by
    worker, keeping only the wanted keys."""

    def __init__(
        self, wanted: dict[str, dict[str, int]], preprocess: Callable, counters: SkipCounters, retries, delay
    ):
        self.wanted, self.preprocess, self.counters = wanted, preprocess, counters
        self.retries, self.delay = retries, delay

    def _convert(self, sample: dict):
        label = self.wanted[sample["__url__"]][sample["__key__"]]
        return self.preprocess(decode_image(image_of(sample))), label

    def __iter__(self):
        if not self.wanted:
            return iter(())
        return iter(
            wds.DataPipeline(
                wds.SimpleShardList(list(self.wanted)),
                wds.split_by_worker,
                lambda shards: read_shards(
                    (s["url"] for s in shards), self.counters, self.retries, self.delay
                ),
                wds.select(lambda sample: sample["__key__"] in self.wanted[sample["__url__"]]),
                functools.partial(usable, convert=self._convert, counters=self.counters),
            )
        )


def _collate(batch: list):
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


class LabelledLoader:
    """Iterable of (images, labels) over this rank's part. `num_samples` is this rank's count,
    `total_samples` the count over all ranks, `classes` the folder names (ImageFolder) or None."""

    def __init__(self, dataset, batch_size: int, num_workers: int, counters: SkipCounters, **info):
        self.num_samples = info["num_samples"]
        self.total_samples = info["total_samples"]
        self.num_classes = info["num_classes"]
        self.classes = info["classes"]
        self._counters = counters
        self._loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, shuffle=False
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._loader:
            if batch is not None:
                yield batch

    def skipped(self) -> dict[str, int]:
        return self._counters.as_dict()


def _index_shards(source, counters: SkipCounters, retries: int, delay: float) -> list[tuple[str, str, int]]:
    urls = [u for urls, _ in expand_shards(source) for u in urls]
    check_protocols(urls)

    def entry(sample: dict) -> tuple[str, str, int]:
        image_of(sample)  # present; decoded only in the second pass, on the rank that uses it
        return sample["__url__"], sample["__key__"], label_of(sample)

    return list(usable(read_shards(urls, counters, retries, delay), entry, counters))


def make_labelled_loader(
    source: str | os.PathLike | Sequence[str],
    preprocess: Callable,
    batch_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    max_per_class: int | None = None,
    num_workers: int = 0,
    classnames: Sequence[str] | None = None,
    seed: int = 0,
    retries: int = 3,
    retry_delay: float = 1.0,
) -> LabelledLoader:
    """Loader over rank `rank`'s disjoint part of a labelled set (see the module docstring).

    With `classnames`, their count is checked against the data: equal to the number of class folders,
    or greater than every `cls` label of a shard set.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    counters = SkipCounters()
    folder = (
        isinstance(source, str | os.PathLike)
        and Path(source).is_dir()
        and any(p.is_dir() for p in Path(source).iterdir())
    )
    if folder:
        classes, class_to_idx = find_classes(str(source))
        entries = make_dataset(str(source), class_to_idx, extensions=IMG_EXTENSIONS)
        num_classes = len(classes)
        if classnames is not None and len(classnames) != num_classes:
            raise ValueError(
                f"{len(classnames)} class names but {num_classes} class folders in {str(source)!r}"
            )
    else:
        classes = None
        entries = _index_shards(source, counters, retries, retry_delay)
        num_classes = max((label for *_, label in entries), default=-1) + 1
        if classnames is not None and num_classes > len(classnames):
            raise ValueError(
                f"{len(classnames)} class names but shard labels go up to {num_classes - 1} in {source!r}"
            )
    if not entries:
        raise ValueError(f"labelled set {source!r} has no usable samples (skipped: {counters.as_dict()})")
    entries = _select(entries, [e[-1] for e in entries], max_per_class, seed)
    part = entries[rank::world_size]
    if folder:
        dataset = _FolderPart(part, preprocess, counters)
    else:
        wanted: dict[str, dict[str, int]] = {}
        for url, key, label in part:
            wanted.setdefault(url, {})[key] = label
        dataset = _ShardPart(wanted, preprocess, counters, retries, retry_delay)
    return LabelledLoader(
        dataset,
        batch_size,
        num_workers,
        counters,
        num_samples=len(part),
        total_samples=len(entries),
        num_classes=num_classes,
        classes=classes,
    )
