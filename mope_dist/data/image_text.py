"""Image-text training pipeline over webdataset tar shards, with equal batch counts on every rank.

Collective ops hang when one rank runs out of batches, so the per-rank count is fixed up front from a
known sample count (`samples_per_epoch`, or sizes.json / img2dataset `*_stats.json`):
`num_batches = samples_per_epoch // (batch_size * world_size)`, split over the DataLoader workers
(worker w yields `num_batches // W + (w < num_batches % W)`; they interleave round-robin). A worker whose
shards run short wraps around and repeats them; one with more data stops early.

Modes:
- "finite": each epoch the shard list is shuffled identically on every rank (seed + epoch), then split by
  rank and by worker (needs at least world_size * workers shards). With balanced shards every sample is
  seen once per epoch. Resuming mid-epoch (`start_step`) fast-forwards each worker past the samples the
  interrupted run already consumed (decoding, not preprocessing them).
- "resampled": every worker draws shards with replacement (weights from the spec's `@w`) from an RNG
  seeded by (seed, rank, worker, epoch, start_step): ranks and workers see different streams, a run is
  reproducible, and a resumed run (start_step > 0) draws new data instead of replaying the beginning.

Bad input never stops training: samples without an image or caption, empty captions, undecodable images,
truncated shards and unreadable shards (after retries) are skipped, logged and counted per reason in
shared memory, so `loader.skipped()` on the rank sums all its workers (`sample_counts()` gives the used
and skipped sample totals the trainer's `data.max_skip_rate` check needs). Only two situations stop
the loader, with a JobError naming the cause: no shard at all can be read (a worker has tried every
shard of the spec without getting a sample, or 64 shards in a row gave none), or 10,000 unusable
samples in a row (wrong field names, an undecodable format).
"""

from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import os
import random
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mope_dist import dist
from mope_dist.data.shards import (
    ShardError,
    check_protocols,
    expand_shards,
    is_local,
    iter_shard_samples,
    shard_sizes,
)
from mope_dist.errors import JobError
from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SAMPLE_SKIP_REASONS = ("missing_image", "missing_caption", "empty_caption", "bad_image")
SKIP_REASONS = (*SAMPLE_SKIP_REASONS, "truncated_shard", "unreadable_shard")
_MAX_EMPTY_DRAWS = 64  # resampled: this many consecutive shards without a sample is an error
_MAX_BAD_IN_A_ROW = 10_000  # this many consecutive unusable samples is an error, not an endless loop


class SkipCounters:
    """Per-reason counts in shared memory, created before DataLoader workers start (fork or spawn)."""

    def __init__(self, reasons: tuple[str, ...] = SKIP_REASONS):
        self.reasons = reasons
        self._counts = mp.Array("q", len(reasons))

    def add(self, reason: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[self.reasons.index(reason)] += n

    def as_dict(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(self.reasons, self._counts[:], strict=True))


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Streaming shuffle through a buffer of `bufsize` items (all items come out exactly once)."""
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _seed(*parts) -> random.Random:
    """An RNG seeded from a tuple, identical across processes and Python hash seeds."""
    return random.Random("/".join(map(str, parts)))


def worker_share(total: int, worker: int, num_workers: int) -> int:
    return total // num_workers + (1 if worker < total % num_workers else 0)


class _ImageTextStream(IterableDataset):
    """The per-worker stream; the epoch and start step live in shared memory so persistent workers see
    `set_epoch` without being restarted."""

    def __init__(self, loader: ImageTextLoader):
        self.p = loader._params
        self.counters = loader._counters
        self.state = loader._state
        self.dead: set[str] = set()  # shards this worker could not open (after retries): not tried again

    def _read(self, urls, max_empty: int | None) -> Iterator[dict]:
        """Samples of `urls` in order; a shard that fails is skipped (counted, logged). With `max_empty`,
        stop with a JobError once that many shards in a row, or every shard of the spec, gave nothing."""
        empty, failed, ever = 0, set(), False
        every = {u for urls, _ in self.p["sources"] for u in urls}
        for url in urls:
            if url in self.dead:
                if self.dead >= every:
                    raise self._none_readable(len(every), url)
                continue
            got = 0
            try:
                for sample in iter_shard_samples(url, self.p["retries"], self.p["retry_delay"]):
                    got += 1
                    yield sample
            except ShardError as exc:
                self.counters.add(exc.reason)
                failed.add(url)
                attempts = ""
                if exc.reason == "unreadable_shard":
                    self.dead.add(url)
                    attempts = f" after {self.p['retries']} attempts (not retried again by this worker)"
                log.error("skipping shard%s: %s", attempts, exc)
            ever = ever or got > 0
            empty = 0 if got else empty + 1
            if max_empty is None:
                continue
            if not ever and failed >= every:
                raise self._none_readable(len(every), url)
            if empty >= max_empty:
                raise JobError(
                    f"{empty} shards in a row gave no samples (last: {url}); check data.train_shards"
                )

    def _none_readable(self, n: int, last: str) -> JobError:
        return JobError(
            f"no shard of the {n} in the spec can be read (each tried {self.p['retries']} times; last: "
            f"{last}); check data.train_shards and access to it"
        )

    def _raw_samples(self, worker: int, num_workers: int, epoch: int, start_step: int) -> Iterator[dict]:
        p = self.p
        rank, world = p["rank"], p["world_size"]
        if p["mode"] == "finite":
            urls = [u for urls, _ in p["sources"] for u in urls]
            _seed(p["seed"], epoch).shuffle(urls)
            mine = urls[rank::world][worker::num_workers]
            rng = _seed(p["seed"], epoch, rank, worker, "samples")
            for _ in itertools.count():  # wrap around: repeat the worker's shards until its quota is met
                got = 0
                for sample in shuffled(self._read(mine, None), p["shuffle_buffer"], rng):
                    got += 1
                    yield sample
                if not got:
                    break
            log.error(
                "rank %d worker %d: no readable sample in its %d shards (first %s); drawing from all shards",
                rank,
                worker,
                len(mine),
                mine[0],
            )
        urls = [u for urls, _ in p["sources"] for u in urls]
        cum_weights = list(itertools.accumulate(w for urls, w in p["sources"] for _ in urls))
        rng = _seed(p["seed"], rank, worker, epoch, start_step, p["mode"])
        draws = (rng.choices(urls, cum_weights=cum_weights)[0] for _ in itertools.count())
        yield from shuffled(self._read(draws, _MAX_EMPTY_DRAWS), p["shuffle_buffer"], rng)

    def _prepare(self, sample: dict, transform: bool = True, count: bool = True):
        """(image tensor or None, caption) for a usable sample, else None (counted by reason)."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        reason = None
        if ext is None:
            reason = "missing_image"
        elif "txt" not in sample:
            reason = "missing_caption"
        else:
            text = sample["txt"].decode("utf-8", errors="replace").strip()
            if not text:
                reason = "empty_caption"
            else:
                try:
                    img = decode_image(sample[ext])
                    return (self.p["preprocess"](img) if transform else None), text
                except Exception as exc:  # any decoder or transform failure is a bad sample
                    reason = "bad_image"
                    log.debug("bad image %s in %s: %s", sample["__key__"], sample["__url__"], exc)
        if count:
            self.counters.add(reason)
        return None

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_step = self.state[0], self.state[1]
        p = self.p
        bs = p["batch_size"]
        # this worker's share of the epoch minus its share of the batches consumed before a resume (the
        # DataLoader takes batches from workers round-robin)
        done = worker_share(start_step, worker, num_workers)
        quota = worker_share(p["num_batches"], worker, num_workers) - done
        if quota <= 0:
            return
        samples = self._raw_samples(worker, num_workers, epoch, start_step)
        fast_forward = done * bs if p["mode"] == "finite" else 0  # samples the interrupted run consumed
        for _ in range(fast_forward):
            self._next_usable(samples, transform=False, count=False)
        for _ in range(quota):
            items = [self._next_usable(samples) for _ in range(bs)]
            yield torch.stack([image for image, _ in items]), p["tokenizer"]([text for _, text in items])

    def _next_usable(self, samples: Iterator[dict], **kw):
        for _ in range(_MAX_BAD_IN_A_ROW):
            item = self._prepare(next(samples), **kw)
            if item is not None:
                return item
        raise JobError(
            f"{_MAX_BAD_IN_A_ROW} unusable samples in a row (skipped so far: {self.counters.as_dict()}); "
            "check the shards' image/caption fields and decoders"
        )


class ImageTextLoader:
    """Iterable of (images [B,3,H,W], tokens [B,ctx]) yielding exactly `num_batches` per epoch on every rank.

    `shards` is a shard spec (see mope_dist.data.shards). `preprocess` maps a PIL RGB image to a tensor
    (open_clip's transform); `tokenizer` maps a list of captions to a token tensor (open_clip's tokenizer
    with the model's context length). rank/world_size default to the current process group.
    Iterating advances the epoch; call `set_epoch(epoch, start_step)` to resume, where `start_step` is
    the number of batches of that epoch already consumed (the epoch then yields the remaining ones).
    """

    def __init__(
        self,
        shards,
        preprocess: Callable,
        tokenizer: Callable,
        batch_size: int,
        num_workers: int = 0,
        mode: str = "finite",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        samples_per_epoch: int | None = None,
        epoch: int = 0,
        start_step: int = 0,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        retries: int = 3,
        retry_delay: float = 1.0,
        prefetch_factor: int = 2,
    ):
        if mode not in ("finite", "resampled"):
            raise ValueError(f"mode must be 'finite' or 'resampled', got {mode!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
        sources = expand_shards(shards)
        urls = [u for urls, _ in sources for u in urls]
        check_protocols(urls)
        local = [u for u in urls if is_local(u)]
        if local and len(local) == len(urls) and not any(os.path.exists(u) for u in local):
            raise FileNotFoundError(f"no shard of {shards!r} exists (first: {urls[0]})")
        if mode == "finite":
            if any(w != 1.0 for _, w in sources):
                raise ValueError("source weights (@w) need mode='resampled'")
            needed = world_size * max(1, num_workers)
            if len(urls) < needed:
                raise ValueError(
                    f"finite mode needs at least world_size x workers = {world_size} x {max(1, num_workers)} = "
                    f"{needed} shards, got {len(urls)}: use fewer workers, more shards or mode='resampled'"
                )
        if samples_per_epoch is None:
            sizes = shard_sizes(urls)
            unknown = [u for u, s in zip(urls, sizes, strict=True) if s is None]
            if unknown:
                raise ValueError(
                    f"sample count unknown for {len(unknown)} of {len(urls)} shards (e.g. {unknown[0]}): pass "
                    "samples_per_epoch, or put sizes.json ({shard name: count}) or img2dataset *_stats.json "
                    "beside the shards"
                )
            samples_per_epoch = sum(sizes)
        self.batch_size = batch_size
        self.world_size = world_size
        self.num_batches = samples_per_epoch // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{samples_per_epoch} samples per epoch are fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.num_samples = self.num_batches * batch_size * world_size  # per epoch, all ranks
        self._params = dict(
            sources=sources,
            preprocess=preprocess,
            tokenizer=tokenizer,
            batch_size=batch_size,
            mode=mode,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_batches=self.num_batches,
            shuffle_buffer=shuffle_buffer,
            retries=retries,
            retry_delay=retry_delay,
        )
        self._counters = SkipCounters()
        self._used = 0  # samples yielded to the caller (main process) since creation
        self._state = mp.Array("q", 2, lock=False)  # epoch, start_step: read by workers at each epoch
        self.set_epoch(epoch, start_step)
        self._loader = DataLoader(
            _ImageTextStream(self),
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    @property
    def epoch(self) -> int:
        return self._state[0]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step < self.num_batches:
            raise ValueError(f"start_step must be in [0, {self.num_batches}), got {start_step}")
        self._state[0], self._state[1] = epoch, start_step

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        remaining = self.num_batches - self._state[1]
        it = iter(self._loader)
        for _ in range(remaining):
            batch = next(it, None)
            if batch is None:
                raise RuntimeError("data loader workers stopped before the epoch's batch count (bug)")
            self._used += len(batch[0])
            yield batch
        self.set_epoch(self.epoch + 1)

    def skipped(self) -> dict[str, int]:
        """Skipped samples/shards per reason on this rank, summed over its workers, since creation."""
        return self._counters.as_dict()

    def sample_counts(self) -> dict[str, int]:
        """{"used": samples yielded on this rank, "skipped": unusable samples skipped by its workers}."""
        counts = self._counters.as_dict()
        return {"used": self._used, "skipped": sum(counts[k] for k in SAMPLE_SKIP_REASONS)}


def make_image_text_loader(shards, preprocess, tokenizer, batch_size, **kwargs) -> ImageTextLoader:
    """Same as ImageTextLoader(...) (the contract's factory name)."""
    return ImageTextLoader(shards, preprocess, tokenizer, batch_size, **kwargs)
