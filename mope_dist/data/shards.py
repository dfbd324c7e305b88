"""Shard specs -> URL lists, opening a shard URL (local, fsspec, `pipe:`), reading samples, sample counts.

Shard spec syntax (a string, or a list of such strings whose sources are concatenated):

    SOURCE[::SOURCE...]          several sources joined with `::`
    SOURCE = PATTERN[@WEIGHT]    PATTERN is brace-expanded: `shards/{000000..000099}.tar`, `{a,b}.tar`

A PATTERN is a local path (a directory stands for the sorted `*.tar` inside it), an fsspec URL
(`s3://`, `gs://`, `file://`, `memory://`, `http://` ...) or `pipe:COMMAND` (the command writes the tar
to stdout, e.g. `pipe:aws s3 cp s3://bucket/{0..9}.tar -`). `@WEIGHT` (default 1) is open_clip's
upsampling factor: in resampled mode it multiplies the draw probability of *each shard* of that source,
so with all weights 1 every shard is equally likely. fsspec's own `::` URL chaining
(`simplecache::s3://...`) therefore cannot be written in a spec.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
from braceexpand import braceexpand

from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")

_WEIGHT_RE = re.compile(r"^(.*)@(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)$")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


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
                if is_local(url) and os.path.isdir(url):
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


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


class _PipeStream(io.RawIOBase):
    """stdout of a `pipe:` command as a binary stream; a non-zero exit status surfaces as OSError."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0:
            self._check()
        return n

    def _check(self) -> None:
        rc = self.proc.wait()
        if rc != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip()[-500:]
            raise OSError(f"pipe command exited with status {rc}: {self.command!r} {err}")

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()
        super().close()


def open_shard(url: str):
    """Open a shard for sequential binary reading."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url[len("pipe:") :]), buffer_size=1 << 16)
    if is_local(url):
        return open(url, "rb", buffering=1 << 16)  # noqa: SIM115 - closed by the caller
    return fsspec.open(url, "rb").open()


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on the TarFile when the end-of-archive block was read: tarfile silently treats a missing,
    partial or garbled final header as the end, which would hide a truncated shard."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.clean_end = True
            raise


class ShardError(Exception):
    """A shard could not be read: `reason` is 'unreadable_shard' or 'truncated_shard'."""

    def __init__(self, reason: str, url: str, cause: BaseException):
        super().__init__(f"{reason}: {url}: {type(cause).__name__}: {cause}")
        self.reason = reason


def iter_shard_samples(url: str, retries: int = 3, retry_delay: float = 1.0) -> Iterator[dict]:
    """Yield the samples of one tar shard as dicts {'__key__', '__url__', ext: bytes}.

    Members are grouped by key (webdataset convention: key = name up to the first dot of the basename,
    extension lower-cased). Opening is retried `retries` times; a shard that fails before its first
    member raises ShardError('unreadable_shard'), one that fails later (truncated, broken pipe)
    ShardError('truncated_shard') after the complete samples before the damage were yielded.
    """
    for attempt in range(retries):
        current: dict | None = None
        started = False
        try:
            with (
                open_shard(url) as stream,
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo) as tar,
            ):
                for member in tar:
                    started = True
                    if not member.isfile():
                        continue
                    match = _KEY_RE.match(member.name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    data = tar.extractfile(member).read()
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = data
                if not getattr(tar, "clean_end", False):
                    raise tarfile.ReadError("archive ends without its end-of-archive block")
            if current is not None:
                yield current
            return
        except Exception as exc:  # any I/O, tar or pipe failure: skip the shard, never crash
            if started:
                if current is not None:
                    yield current
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


def shard_sizes(urls: Sequence[str]) -> list[int | None]:
    """Sample count of each shard, from `sizes.json` beside it ({basename: count}, open_clip's
    convention) or img2dataset's per-shard `<stem>_stats.json` ('successes'); None where unknown."""
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
        stats = _read_json(re.sub(r"\.tar(\.\w+)?$", "", url) + "_stats.json")
        out.append(int(stats["successes"]) if isinstance(stats, dict) and "successes" in stats else None)
    return out
