"""Image-text training loader: one webdataset pipeline per DataLoader worker, equal batch counts on every
rank, and an exact, elastic data position.

Each worker runs `wds.DataPipeline(source stream, *stages, usable samples, wds.slice, wds.batched)`:
- source streams (sources.py): webdataset's shard list, split by rank and worker (finite) or drawn with
  replacement (resampled), read by our strict tar reader (`shards.tar_file_expander` + webdataset's
  `group_by_keys`), shuffled by `wds.shuffle`;
- `stages`: the user's own webdataset stages (filters, maps, decoders) on the raw samples, see README;
- unusable samples (no image or caption, empty caption, undecodable image) dropped and counted per
  reason in shared memory (samples.py), with unreadable and truncated shards, so `loader.skipped()` on
  the rank sums all its workers;
- the open_clip transform per sample, the tokenizer per batch.

Equal batches: collective ops hang when one rank runs out of batches, so the per-rank count is fixed up
front from a known sample count (`samples_per_epoch`, or sizes.json / img2dataset `*_stats.json`):
`num_batches = samples_per_epoch // (batch_size * world_size)`, split over the workers in round-robin
shares (`wds.slice`); a worker short of data repeats its shards, one with more stops early. In finite mode
with balanced shards every sample is seen once per epoch.

Position (position.py): every batch carries how far its worker read, so `state_dict()` says exactly
where each worker is; `load_state_dict(states)` (every rank's state) continues the same sample sequence
after any number of interruptions, without decoding what it skips, and remaps it onto another world size
or worker count (the interrupted epoch is finished by redistributing its remaining samples).

Only two situations stop the loader, with a JobError naming the cause: no shard at all can be read, or
10,000 unusable samples in a row (wrong field names, an undecodable format).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mope_dist import dist
from mope_dist.data import position
from mope_dist.data.device import collate_images
from mope_dist.data.samples import (
    SAMPLE_SKIP_REASONS,
    SkipCounters,
    caption_of,
    decode_image,
    image_of,
    usable,
)
from mope_dist.data.shards import check_protocols, expand_shards, shard_sizes
from mope_dist.data.sources import ShardReader, SourceSpec, seeded
from mope_dist.utils import get_logger, is_local_path

log = get_logger("mope_dist.data")

_MAX_BAD_IN_A_ROW = 10_000  # this many consecutive unusable samples is an error, not an endless loop
_PLAN_BYTES = 1 << 20


class _SharedPlan:
    """The current plan as JSON in shared memory: persistent workers read it at each epoch start."""

    def __init__(self):
        self._data = mp.Array("c", _PLAN_BYTES, lock=False)
        self._size = mp.Value("q", 0, lock=False)

    def write(self, plan: dict) -> None:
        data = json.dumps(plan).encode()
        if len(data) > _PLAN_BYTES:
            raise ValueError(f"data position of {len(data)} bytes exceeds {_PLAN_BYTES} (too many segments)")
        self._data[: len(data)] = data
        self._size.value = len(data)

    def read(self) -> dict:
        return json.loads(self._data[: self._size.value])


class _WorkerStream(IterableDataset):
    """What one DataLoader worker yields in the current plan: (images, tokens, logical worker, raw
    position after the batch)."""

    def __init__(self, loader: ImageTextLoader, preprocess, tokenizer, stages, retries, retry_delay):
        self.spec, self.plan, self.counters = loader._spec, loader._shared_plan, loader._counters
        self.batch_size = loader.batch_size
        self.preprocess, self.tokenizer, self.stages = preprocess, tokenizer, list(stages)
        self.retries, self.retry_delay = retries, retry_delay
        self.reader: ShardReader | None = None  # made in the worker; keeps its dead shards across epochs

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan.read()
        if len(plan["streams"]) != num_workers:
            raise RuntimeError(f"plan for {len(plan['streams'])} workers run by {num_workers} (bug)")
        logical = (plan["first"] + worker) % num_workers
        stream = plan["streams"][logical]
        if stream["batches"] <= 0:
            return iter(())
        if self.reader is None:
            self.reader = ShardReader(set(self.spec.urls), self.counters, self.retries, self.retry_delay)
        return iter(
            wds.DataPipeline(
                lambda: self._samples(plan["epoch"], stream["segments"]),
                *self.stages,
                functools.partial(
                    usable, convert=self._convert, counters=self.counters, max_in_a_row=_MAX_BAD_IN_A_ROW
                ),
                wds.slice(stream["batches"] * self.batch_size),  # before batching: no sample read ahead
                wds.batched(
                    self.batch_size, collation_fn=functools.partial(self._collate, logical), partial=False
                ),
            )
        )

    def _samples(self, epoch: int, segments: list[list]) -> Iterator[dict]:
        """The raw samples of the worker's segments, each tagged with its position `__index__`."""
        index = 0
        for k, (world, rank, workers, worker, start, stop) in enumerate(segments):
            with contextlib.closing(
                self.spec.stream(epoch, (world, rank, workers, worker), start, self.reader)
            ) as s:
                part = s if k == len(segments) - 1 else itertools.islice(s, stop - start)
                for sample in part:
                    index += 1
                    if "__missing__" not in sample:  # a sample missing from a damaged shard: counted there
                        sample["__index__"] = index - 1
                        sample["__epoch__"] = epoch
                        yield sample

    def _convert(self, sample: dict):
        image, text = image_of(sample), caption_of(sample)
        if not getattr(self.preprocess, "encoded", False):  # JpegCrops takes the encoded image
            image = decode_image(image)
        # the transform's random crop drawn from the sample itself (seed, epoch, shard, key), not from
        # how many samples this worker transformed before: a resumed or re-laid-out run (other ranks
        # or workers) gets the same pixels, not only the same samples. The CPU RNG's state is put back
        # after: a loader without workers runs this in the trainer's process, whose RNG it must not
        # reseed (torch.random.fork_rng would do the same at twice the cost, touching every device).
        parts = (self.spec.seed, sample.get("__epoch__"), sample.get("__url__"), sample.get("__key__"))
        rng = torch.default_generator
        outer = rng.get_state()
        try:
            rng.manual_seed(seeded(*parts).getrandbits(63))
            image = self.preprocess(image)
        finally:
            rng.set_state(outer)
        return image, text, sample.get("__index__")

    def _collate(self, logical: int, items: list):
        end = items[-1][2]
        if end is None:
            raise RuntimeError(
                "a data stage dropped the samples' '__index__' key (their position): a stage must return "
                "the sample dict with its '__' keys"
            )
        return (
            collate_images([image for image, _, _ in items]),
            self.tokenizer([t for _, t, _ in items]),
            logical,
            end + 1,
        )


class ImageTextLoader:
    """Iterable of (images [B,3,H,W], tokens [B,ctx]) yielding exactly `num_batches` per epoch on every rank.

    `shards` is a shard spec (see mope_dist.data.shards). `preprocess` maps a PIL RGB image to a tensor
    (or, with an `encoded` attribute set, e.g. mope_dist.data.device.JpegCrops, the image field as read)
    (open_clip's transform); `tokenizer` maps a list of captions to a token tensor (open_clip's tokenizer
    with the model's context length). rank/world_size default to the current process group. `stages`:
    webdataset stages run in each worker on the shuffled raw samples (dicts of bytes by extension) before
    decoding; they must keep the samples' order and their '__' keys (e.g. `wds.select`, `wds.map`,
    `wds.decode`; not a shuffle).

    Iterating yields the rest of the current epoch and advances it. Position: `state_dict()` (this rank),
    `load_state_dict(states)` (every rank's state of the saved run, in rank order), or
    `set_epoch(epoch, start_step)`, exact as long as the skipped batches held no unusable sample.
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
        stages: Sequence[Callable] = (),
    ):
        if mode not in ("finite", "resampled"):
            raise ValueError(f"mode must be 'finite' or 'resampled', got {mode!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.workers = max(1, num_workers)
        self.batch_size = batch_size
        sources = expand_shards(shards)
        urls = [u for urls, _ in sources for u in urls]
        check_protocols(urls)
        local = [u for u in urls if is_local_path(u)]
        if local and len(local) == len(urls) and not any(os.path.exists(u) for u in local):
            raise FileNotFoundError(f"no shard of {shards!r} exists (first: {urls[0]})")
        if mode == "finite":
            if any(w != 1.0 for _, w in sources):
                raise ValueError("source weights (@w) need mode='resampled'")
            needed = self.world_size * self.workers
            if len(urls) < needed:
                raise ValueError(
                    f"finite mode needs at least world_size x workers = {self.world_size} x {self.workers} = "
                    f"{needed} shards, got {len(urls)}: use fewer workers, more shards or mode='resampled'"
                )
        # per-shard stats files are one request each: only looked up when needed or cheap
        sizes = shard_sizes(urls, per_shard_stats=samples_per_epoch is None or len(local) == len(urls))
        if samples_per_epoch is None:
            unknown = [u for u, s in zip(urls, sizes, strict=True) if s is None]
            if unknown:
                raise ValueError(
                    f"sample count unknown for {len(unknown)} of {len(urls)} shards (e.g. {unknown[0]}): pass "
                    "samples_per_epoch, or put sizes.json ({shard name: count}) or img2dataset *_stats.json "
                    "beside the shards"
                )
            samples_per_epoch = sum(sizes)
        self.num_batches = samples_per_epoch // (batch_size * self.world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{samples_per_epoch} samples per epoch are fewer than one global batch "
                f"({batch_size} x {self.world_size} ranks)"
            )
        self.num_samples = self.num_batches * batch_size * self.world_size  # per epoch, all ranks
        self._spec = SourceSpec(sources, sizes, mode, seed, shuffle_buffer)
        self._counters = SkipCounters()
        self._used = 0  # samples yielded to the caller (main process) since creation
        self._shared_plan = _SharedPlan()
        self.set_epoch(epoch, start_step)
        self._loader = DataLoader(
            _WorkerStream(self, preprocess, tokenizer, stages, retries, retry_delay),
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    # ---- position -------------------------------------------------------------------------------------

    def _start(self, plan: dict) -> None:
        self._plan = plan
        self._consumed = [0] * len(plan["streams"])  # raw samples read by each logical worker for its batches
        self._taken = [0] * len(plan["streams"])  # batches taken from each logical worker

    @property
    def epoch(self) -> int:
        return self._plan["epoch"]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Start `epoch` after its first `start_step` batches (assumed free of unusable samples)."""
        if not 0 <= start_step < self.num_batches:
            raise ValueError(f"start_step must be in [0, {self.num_batches}), got {start_step}")
        plan = position.epoch_plan(epoch, self.rank, self.world_size, self.workers, self.num_batches)
        done = [position.share(start_step, w, self.workers) for w in range(self.workers)]
        self._start(position.advance(plan, [n * self.batch_size for n in done], done))

    def _identity(self) -> dict:
        spec = self._spec
        return {"version": position.VERSION, "mode": spec.mode, "seed": spec.seed, "shards": len(spec.urls)}

    def state_dict(self) -> dict:
        """This rank's data position (small, JSON-able): store every rank's in the checkpoint."""
        plan = position.advance(self._plan, self._consumed, self._taken)
        return {
            **self._identity(),
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            **plan,
        }

    def load_state_dict(self, states: list[dict] | dict) -> None:
        """Continue from the saved position: `states` is every rank's `state_dict()` of the saved run, in
        rank order. Another world size, worker count or batch size remaps the rest of the interrupted
        epoch (position.remap); the log says so."""
        states = [states] if isinstance(states, dict) else list(states)
        ours = self._identity()
        for i, st in enumerate(states):
            theirs = {k: st.get(k) for k in ours}
            if theirs != ours or st.get("rank") != i or st.get("epoch") != states[0].get("epoch"):
                raise ValueError(
                    f"saved data position of rank {st.get('rank')} ({theirs}, epoch {st.get('epoch')}) does "
                    f"not fit this loader ({ours}) or the other ranks' positions"
                )
        same = (len(states), len(states[0]["streams"]), states[0]["batch_size"]) == (
            self.world_size,
            self.workers,
            self.batch_size,
        )
        if same:
            self._start({k: states[self.rank][k] for k in ("epoch", "first", "streams")})
            return
        plan, total, left_out = position.remap(
            states, self.rank, self.world_size, self.workers, self.batch_size
        )
        log.info(
            "data position saved on %d ranks x %d workers (batch %d) resumes on %d x %d (batch %d): the %d "
            "samples left in epoch %d are redistributed, %d batches per rank; %d left out (less than one "
            "batch per rank)",
            len(states),
            len(states[0]["streams"]),
            states[0]["batch_size"],
            self.world_size,
            self.workers,
            self.batch_size,
            total,
            plan["epoch"],
            sum(s["batches"] for s in plan["streams"]),
            left_out,
        )
        self._start(plan)

    # ---- iteration ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._start(position.advance(self._plan, self._consumed, self._taken))
        plan = self._plan
        self._shared_plan.write(plan)
        workers = len(plan["streams"])
        it = iter(self._loader)
        for k in range(sum(s["batches"] for s in plan["streams"])):
            batch = next(it, None)
            if batch is None:
                raise RuntimeError("data loader workers stopped before the epoch's batch count (bug)")
            images, tokens, logical, end = batch
            if logical != (plan["first"] + k) % workers:
                raise RuntimeError(f"batch {k} came from worker {logical}, not in round-robin order (bug)")
            self._consumed[logical], self._taken[logical] = end, self._taken[logical] + 1
            self._used += len(images)
            yield images, tokens
        self.set_epoch(self.epoch + 1)

    def skipped(self) -> dict[str, int]:
        """Skipped samples/shards per reason on this rank, summed over its workers, since creation."""
        return self._counters.as_dict()

    def count_unusable(self, reason: str) -> None:
        """A sample of a yielded batch found unusable after the workers (data.decode=device: a JPEG the
        device could not decode), counted with theirs (logs, data.max_skip_rate)."""
        self._counters.add(reason)

    def sample_counts(self) -> dict[str, int]:
        """{"used": samples yielded on this rank, "skipped": unusable samples skipped by its workers}."""
        counts = self._counters.as_dict()
        return {"used": self._used, "skipped": sum(counts[k] for k in SAMPLE_SKIP_REASONS)}


def make_image_text_loader(shards, preprocess, tokenizer, batch_size, **kwargs) -> ImageTextLoader:
    """Same as ImageTextLoader(...) (the contract's factory name)."""
    return ImageTextLoader(shards, preprocess, tokenizer, batch_size, **kwargs)
