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
import io
import json
import os
import re
import subprocess
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


def check_protocols(urls: Sequence[str]) -> None:
    """Fail early and clearly when an fsspec backend (s3fs, gcsfs, ...) is missing, instead of once per shard."""
    for protocol in sorted(
        {u.split("://", 1)[0] for u in urls if not is_local(u) and not u.startswith("pipe:")}
    ):
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"cannot open {protocol}:// shards: {exc}") from exc


class _PipeStream(io.RawIOBase):
    """stdout of a `pipe:` command as a binary stream; a non-zero exit status surfaces as OSError.
    The command's stderr goes to ours (a captured one could fill up and block, e.g. curl's progress)."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

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
            raise OSError(f"pipe command exited with status {rc}: {self.command!r}")

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
        super().close()


def open_shard(url: str):
    """Open a shard for sequential binary reading."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url[len("pipe:") :]), buffer_size=1 << 16)
    if is_local(url):
        return open(url, "rb", buffering=1 << 16)  # noqa: SIM115 - closed by the caller
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
            with open_shard(url) as raw:
                stream = gzip.GzipFile(fileobj=raw) if url.endswith((".gz", ".tgz")) else raw
                for name, data in iter_tar_files(stream):
                    started = True
                    match = _KEY_RE.match(name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = data
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
