"""Source streams of the image-text loader: deterministic, endless sequences of raw samples that can be
started at any position without decoding, and mostly without reading, what comes before it.

Source stream (world, rank, workers, worker) of an epoch:
- finite: webdataset's SimpleShardList shuffled by (seed, epoch), split by rank then by worker (what
  `wds.split_by_node` / `wds.split_by_worker` do, with the rank given: a resumed run replays the
  streams of an older layout). Its shards are read again and again (a worker short of data repeats
  them); each pass goes through `wds.shuffle` and is flushed at its end, so one pass holds every sample
  of the worker's shards once. A worker none of whose shards gives a sample in a pass goes on drawing
  from all shards.
- resampled: shards drawn with replacement (probability proportional to the spec's `@weight`), read
  through one `wds.shuffle`.

Starting at output `start` (a resume): shards of known size are replayed as placeholders, never opened;
only the shards that still have samples in the shuffle buffer at `start` are read (bytes, not decoded).
For that, a shard of known size (sizes.json, img2dataset stats) always gives exactly that many items:
samples missing from a damaged shard are placeholders that the loader drops, extra ones are not used.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator

import webdataset as wds

from mope_dist.data.samples import SkipCounters
from mope_dist.data.shards import ShardError, iter_shard_samples
from mope_dist.errors import JobError
from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")

_MAX_EMPTY_DRAWS = 64  # drawing: this many consecutive shards without a sample is an error


def seeded(*parts) -> random.Random:
    """An RNG seeded from a tuple, identical across processes and Python hash seeds."""
    return random.Random("/".join(map(str, parts)))


class ShardReader:
    """Reads shards for one DataLoader worker: failures are counted and logged, a shard that failed its
    `retries` attempts is not opened again, a shard of known size gives exactly that many items, and
    "no shard can be read at all" (or, drawing, 64 shards in a row without a sample) is a JobError."""

    def __init__(self, every: set[str], counters: SkipCounters, retries: int, retry_delay: float):
        self.every, self.counters = every, counters
        self.retries, self.retry_delay = retries, retry_delay
        self.dead: set[str] = set()
        self.oversized: set[str] = set()
        self.short: set[str] = set()
        self.empty_draws = 0
        self.samples = 0  # samples read and shards opened (or found dead): they tell a pass that gave nothing
        self.opened = 0

    def __call__(self, url: str, size: int | None, drawn: bool = False) -> Iterator[dict]:
        got, failed = 0, url in self.dead
        self.opened += 1
        if not failed:
            try:
                for sample in iter_shard_samples(url, self.retries, self.retry_delay):
                    if got == size:
                        if url not in self.oversized:
                            self.oversized.add(url)
                            log.warning(
                                "shard %s has more samples than its declared %d: the rest are unused",
                                url,
                                size,
                            )
                        break
                    got += 1
                    self.samples += 1
                    yield sample
            except ShardError as exc:
                failed = True
                self.counters.add(exc.reason)
                attempts = ""
                if exc.reason == "unreadable_shard":
                    self.dead.add(url)
                    attempts = f" after {self.retries} attempts (not retried again by this worker)"
                log.error("skipping shard%s: %s", attempts, exc)
        if self.dead >= self.every:
            raise JobError(
                f"no shard of the {len(self.every)} in the spec can be read (each tried {self.retries} times; "
                f"last: {url}); check data.train_shards and access to it"
            )
        if not failed and got < (size or 0):  # intact, but fewer samples than its declared size
            self.counters.add("short_shard")
            if url not in self.short:
                self.short.add(url)
                log.warning(
                    "shard %s holds %d samples, fewer than its declared %d (sizes.json or *_stats.json): "
                    "counted as short_shard, the missing ones are left out",
                    url,
                    got,
                    size,
                )
        for _ in range(got, size or 0):
            yield {"__url__": url, "__missing__": True}
        if drawn:
            self.empty_draws = 0 if got else self.empty_draws + 1
            if self.empty_draws >= _MAX_EMPTY_DRAWS:
                raise JobError(
                    f"{self.empty_draws} shards in a row gave no samples (last: {url}); check data.train_shards"
                )


def shuffled_from(
    visits: Iterable[tuple[str, int | None]],
    start: int,
    bufsize: int,
    rng: random.Random,
    read: ShardReader,
    drawn: bool,
) -> Iterator[dict]:
    """`wds.shuffle` over the samples of the shard `visits` (url, size), from output `start` on. Returns
    the number of outputs, counting the skipped ones."""
    skipping = start > 0
    pending: dict[int, dict] = {}  # placeholders not yet emitted, by id

    def items() -> Iterator[dict]:
        for visit, (url, size) in enumerate(visits):
            if not (skipping and size is not None):
                yield from read(url, size, drawn)
                continue
            for i in range(size):
                if not skipping:  # the skip ended inside this shard: read it, past the items already in play
                    yield from itertools.islice(read(url, size, drawn), i, None)
                    break
                item = {"__visit__": visit, "__url__": url, "__size__": size, "__item__": i}
                pending[id(item)] = item
                yield item

    n = 0
    for item in wds.shuffle(bufsize, min(bufsize, 100), rng=rng)(items()):
        n += 1
        if skipping:
            if n <= start:
                pending.pop(id(item), None)
                continue
            skipping = False
            _fill(pending.values(), read)
        yield item
    return n


def _fill(placeholders: Iterable[dict], read: ShardReader) -> None:
    """Put the samples in place of the placeholders still in the shuffle buffer, reading their shards."""
    by_visit: dict[int, dict[int, dict]] = {}
    for item in placeholders:
        by_visit.setdefault(item["__visit__"], {})[item["__item__"]] = item
    for wanted in by_visit.values():
        first = next(iter(wanted.values()))
        url, size = first["__url__"], first["__size__"]
        for i, sample in enumerate(itertools.islice(read(url, size), max(wanted) + 1)):
            if i in wanted:
                item = wanted[i]
                item.clear()
                item.update(sample)


class SourceSpec:
    """What defines the source streams, besides the layout: shards, their weights and sizes, mode, seed."""

    def __init__(self, sources, sizes: list[int | None], mode: str, seed: int, shuffle_buffer: int):
        self.urls = [u for urls, _ in sources for u in urls]
        self.cum_weights = list(itertools.accumulate(w for urls, w in sources for _ in urls))
        self.sizes = dict(zip(self.urls, sizes, strict=True))
        self.mode, self.seed, self.shuffle_buffer = mode, seed, shuffle_buffer

    def finite_shards(self, epoch: int, world: int, rank: int, workers: int, worker: int) -> list[str]:
        order = [d["url"] for d in wds.SimpleShardList(self.urls, seed=f"{self.seed}/{epoch}")]
        return order[rank::world][worker::workers]

    def stream(
        self, epoch: int, src: tuple[int, int, int, int], start: int, reader: ShardReader
    ) -> Iterator[dict]:
        """Source stream `src` = (world, rank, workers, worker) of `epoch` from raw output `start` on."""
        rng = seeded(self.seed, epoch, *src, self.mode, "shuffle")
        if self.mode == "finite":
            mine = [(u, self.sizes[u]) for u in self.finite_shards(epoch, *src)]
            while True:  # passes over the worker's shards
                samples, opened = reader.samples, reader.opened
                n = yield from shuffled_from(mine, start, self.shuffle_buffer, rng, reader, False)
                start = max(0, start - n)
                if n == 0 or (reader.opened > opened and reader.samples == samples):
                    break
            log.error(
                "no readable sample in the %d shards of source stream %s (first %s); drawing from all shards",
                len(mine),
                src,
                mine[0][0],
            )
        draws = seeded(self.seed, epoch, *src, self.mode, "draws")
        urls = (draws.choices(self.urls, cum_weights=self.cum_weights)[0] for _ in itertools.count())
        yield from shuffled_from(
            ((u, self.sizes[u]) for u in urls), start, self.shuffle_buffer, rng, reader, True
        )
