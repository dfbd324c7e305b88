"""Shard specs -> URL lists, opening a shard URL (local, fsspec, `pipe:`), reading samples, sample counts.

Shard spec syntax (a string, or a list of such strings whose sources are concatenated):

    SOURCE[::SOURCE...]          several sources joined with `::`
    SOURCE = PATTERN[@WEIGHT]    PATTERN is brace-expanded: `shards/{000000..000099}.tar`, `{a,b}.tar`

A PATTERN is a local path (a directory stands for the sorted `*.tar` inside it), an fsspec URL
(`s3://`, `gs://`, `file://`, `memory://`, `http://` ...) or `pipe:COMMAND` (the command writes the tar
to stdout, e.g. `pipe:aws s3 cp s3://bucket/{0..9}.tar -`). A `pipe:` command is run by the shell
(`sh -c`) with the job's permissions, on every rank: only use shard specs you trust. `@WEIGHT` (default
1) is open_clip's upsampling factor: in resampled mode it multiplies the draw probability of *each
shard* of that source, so with all weights 1 every shard is equally likely. fsspec's own `::` URL chaining
(`simplecache::s3://...`) therefore cannot be written in a spec.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import fsspec
import webdataset as wds
from braceexpand import braceexpand
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys

from mope_dist.utils import get_logger, is_local_path

log = get_logger("mope_dist.data")

_WEIGHT_RE = re.compile(r"^(.*)@(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)$")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[list[str], float]]:
    """Return one (urls, weight) pair per source of `spec` (see the module docstring for the syntax)."""
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    sources: list[tuple[list[str], float]] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            weight = 1.0
            match = _WEIGHT_RE.match(part)
            if match:
                part, weight = match.group(1).strip(), float(match.group(2))
            if not part:
                raise ValueError(f"empty source in shard spec {spec!r}")
            if weight <= 0:
                raise ValueError(f"shard weight must be > 0, got {weight} in {spec!r}")
            urls = []
            for url in braceexpand(part):
                if is_local_path(url) and os.path.isdir(url):
                    found = sorted(str(p) for p in Path(url).glob("*.tar"))
                    if not found:
                        raise ValueError(f"directory {url!r} in shard spec holds no *.tar files")
                    urls.extend(found)
                else:
                    urls.append(url)
            sources.append((urls, weight))
    if not sources:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return sources


def check_protocols(urls: Sequence[str]) -> None:
    """Fail early and clearly when an fsspec backend (s3fs, gcsfs, ...) is missing, instead of once per shard."""
    for protocol in sorted(
        {u.split("://", 1)[0] for u in urls if not is_local_path(u) and not u.startswith("pipe:")}
    ):
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"cannot open {protocol}:// shards: {exc}") from exc


def open_shard(url: str):
    """Open a shard for sequential binary reading: local paths and `pipe:` through webdataset's `gopen`
    (a pipe whose command exits non-zero raises OSError), any other URL through fsspec (s3, gs, memory...)."""
    if url.startswith("pipe:") or is_local_path(url):
        return wds.gopen(url, "rb")
    return fsspec.open(url, "rb").open()


class TarFormatError(OSError):
    """The bytes are not (or no longer) a valid tar stream."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # raw streams may return short reads before EOF
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def iter_tar_files(stream) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of the regular files of a ustar/GNU/PAX tar stream, in order.

    A lean reader instead of `tarfile`: several times faster per member (which shows on small images),
    and strict where tarfile is lenient: a missing, partial or corrupt header before the end-of-archive
    block raises TarFormatError instead of silently ending the archive (a truncated shard).
    """
    long_name = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if header == _ZERO_BLOCK:
            return
        if len(header) < _BLOCK:
            raise TarFormatError("archive ends before its end-of-archive block")
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError("bad tar header checksum")
        size, kind = _octal(header[124:136]), header[156:157]
        data = _read_exact(stream, size)
        if len(data) < size:
            raise TarFormatError("unexpected end of data")
        if size % _BLOCK:
            stream.read(_BLOCK - size % _BLOCK)  # padding; a short one surfaces at the next header
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0")
        elif kind == b"x":  # PAX extended header: 'LEN path=NAME\n' records
            for record in data.split(b"\n"):
                _, _, kv = record.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[len(b"path=") :]
        elif kind == b"g":
            pass
        else:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if long_name is not None:
                name = long_name
            elif prefix:
                name = prefix + b"/" + name
            long_name = None
            if kind in _FILE_TYPES:
                yield name.decode("utf-8", "surrogateescape"), data


def tar_file_expander(data: Iterable[dict], handler: Callable[[Exception], bool] = reraise_exception):
    """Drop-in for `webdataset.tariterators.tar_file_expander` on our strict reader: for each {'url',
    'stream'} yields {'fname', 'data', '__url__'} per regular file and `{}` at the shard's end. A damaged
    shard also yields `{}` first, so `group_by_keys` lets out the last complete sample before the damage."""
    for source in data:
        try:
            for name, payload in iter_tar_files(source["stream"]):
                yield {"fname": name, "data": payload, "__url__": source["url"]}
            yield {}
        except Exception as exc:
            yield {}
            if not handler(exc):
                break


class ShardError(Exception):
    """A shard could not be read: `reason` is 'unreadable_shard' or 'truncated_shard'."""

    def __init__(self, reason: str, url: str, cause: BaseException):
        super().__init__(f"{reason}: {url}: {type(cause).__name__}: {cause}")
        self.reason = reason


def _keep_first_duplicate(exc: Exception) -> bool:
    """group_by_keys handler: a file repeated within one sample is logged and dropped, the shard goes on."""
    log.warning("%s", exc)
    return True


def iter_shard_samples(url: str, retries: int = 3, retry_delay: float = 1.0) -> Iterator[dict]:
    """Yield the samples of one tar shard as dicts {'__key__', '__url__', ext: bytes}.

    webdataset's `group_by_keys` over our `tar_file_expander` (key = name up to the first dot of the
    basename, extension lower-cased). Opening is retried `retries` times; a shard that fails before its
    first sample raises ShardError('unreadable_shard'), one that fails later (truncated, broken pipe)
    ShardError('truncated_shard') after the complete samples before the damage were yielded.
    """
    for attempt in range(retries):
        started = False
        try:
            with open_shard(url) as raw:
                stream = gzip.GzipFile(fileobj=raw) if url.endswith((".gz", ".tgz")) else raw
                files = tar_file_expander([{"url": url, "stream": stream}])
                for sample in group_by_keys(files, handler=_keep_first_duplicate):
                    started = True
                    yield sample
            return
        except Exception as exc:  # any I/O, tar or pipe failure: skip the shard, never crash
            if started:
                raise ShardError("truncated_shard", url, exc) from exc
            if attempt + 1 == retries:
                raise ShardError("unreadable_shard", url, exc) from exc
            log.warning("retrying shard %s after %s: %s", url, type(exc).__name__, exc)
            time.sleep(retry_delay * 2**attempt)


def _read_json(url: str):
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shard_sizes(urls: Sequence[str], per_shard_stats: bool = True) -> list[int | None]:
    """Sample count of each shard, from `sizes.json` beside it ({basename: count}, open_clip's
    convention) or (with `per_shard_stats`) img2dataset's per-shard `<stem>_stats.json` ('successes');
    None where unknown."""
    sizes_by_dir: dict[str, dict | None] = {}
    out: list[int | None] = []
    for url in urls:
        if url.startswith("pipe:"):
            out.append(None)
            continue
        base, _, name = url.rpartition("/")
        if base not in sizes_by_dir:
            sizes = _read_json(f"{base}/sizes.json" if base else "sizes.json")
            sizes_by_dir[base] = sizes if isinstance(sizes, dict) else None
        sizes = sizes_by_dir[base]
        if sizes is not None and name in sizes:
            out.append(int(sizes[name]))
            continue
        if not per_shard_stats:
            out.append(None)
            continue
        stats = _read_json(re.sub(r"\.tar(\.\w+)?$", "", url) + "_stats.json")
        out.append(int(stats["successes"]) if isinstance(stats, dict) and "successes" in stats else None)
    return out
