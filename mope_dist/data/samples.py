"""What every shard reader shares: one vocabulary of skip reasons, counters in shared memory, one list of
image fields, the fields of a sample (image, caption(s), label), and the stages that read shards and
drop unusable samples while counting them.

A sample is webdataset's dict {'__key__', '__url__', ext: bytes}; a user's own webdataset stage may
have decoded a field already (e.g. `wds.decode("pil")`), so the field readers take bytes or decoded
values alike.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator

from PIL import Image

from mope_dist.data.shards import ShardError, iter_shard_samples
from mope_dist.errors import JobError
from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image field of a sample: the first of these it has
SAMPLE_SKIP_REASONS = ("missing_image", "missing_caption", "empty_caption", "missing_label", "bad_image")
SKIP_REASONS = (*SAMPLE_SKIP_REASONS, "truncated_shard", "unreadable_shard", "short_shard")


class SkipCounters:
    """Per-reason counts in shared memory, created before DataLoader workers start (fork or spawn), so
    the rank reads the sum over its workers."""

    def __init__(self):
        self._counts = mp.Array("q", len(SKIP_REASONS))

    def add(self, reason: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += n

    def as_dict(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(SKIP_REASONS, self._counts[:], strict=True))


class Unusable(Exception):
    """A sample that cannot be used, and why (one of SAMPLE_SKIP_REASONS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(value) -> Image.Image:
    """RGB PIL image from encoded bytes, or from an image a user stage already decoded."""
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value))
    return image.convert("RGB")


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def image_of(sample: dict):
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise Unusable("missing_image")


def caption_of(sample: dict) -> str:
    if "txt" not in sample:
        raise Unusable("missing_caption")
    text = _text(sample["txt"]).strip()
    if not text:
        raise Unusable("empty_caption")
    return text


def captions_of(sample: dict) -> list[str]:
    """Captions from `json` ({"captions": [...]}, a list, or {"caption": str}), else `txt` one per line."""
    if "json" in sample:
        meta = sample["json"]
        if isinstance(meta, bytes | str):
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = None
        if isinstance(meta, dict):
            meta = meta.get("captions", [meta["caption"]] if isinstance(meta.get("caption"), str) else None)
        if isinstance(meta, list):
            texts = [t.strip() for t in meta if isinstance(t, str) and t.strip()]
            if texts:
                return texts
    texts = [t.strip() for t in _text(sample.get("txt", b"")).splitlines() if t.strip()]
    if not texts:
        raise Unusable("missing_caption")
    return texts


def label_of(sample: dict) -> int:
    try:
        return int(_text(sample["cls"]).strip())
    except (KeyError, ValueError, TypeError):
        raise Unusable("missing_label") from None


def read_shards(
    urls: Iterable[str], counters: SkipCounters, retries: int, retry_delay: float
) -> Iterator[dict]:
    """The samples of `urls` in order; a shard that fails is skipped (counted by reason, logged) after
    the complete samples before the damage."""
    for url in urls:
        try:
            yield from iter_shard_samples(url, retries, retry_delay)
        except ShardError as exc:
            counters.add(exc.reason)
            log.error("skipping shard: %s", exc)


def usable(
    samples: Iterable[dict],
    convert: Callable[[dict], object],
    counters: SkipCounters,
    max_in_a_row: int | None = None,
) -> Iterator:
    """`convert(sample)` for each sample; samples it rejects (Unusable: that reason; any other exception,
    e.g. from the image decoder or transform: 'bad_image') are dropped and counted. With `max_in_a_row`,
    that many unusable samples in a row is a JobError (wrong field names, an undecodable format), not an
    endless loop."""
    bad = 0
    for sample in samples:
        try:
            item = convert(sample)
        except Exception as exc:  # any decoder or transform failure is a bad sample
            reason = exc.reason if isinstance(exc, Unusable) else "bad_image"
            counters.add(reason)
            log.debug(
                "skipping %s sample %s in %s: %s", reason, sample.get("__key__"), sample.get("__url__"), exc
            )
            bad += 1
            if max_in_a_row is not None and bad >= max_in_a_row:
                raise JobError(
                    f"{bad} unusable samples in a row (skipped so far: {counters.as_dict()}); "
                    "check the shards' image/caption fields and decoders"
                ) from None
            continue
        bad = 0
        yield item
