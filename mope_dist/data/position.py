"""The data position of the image-text loader: a small JSON-able plan of what each DataLoader worker of
a rank still has to read in the current epoch, and its remap to another world size or worker count.

A *source stream* is one deterministic, endless sequence of raw samples (before decoding), named by the
layout that defines it: (world, rank, workers, worker) of epoch `epoch` (see sources.py). A *segment*
[world, rank, workers, worker, start, stop] is the part [start, stop) of one source stream (stop None:
open). A *logical worker* reads its segments in order and makes `batches` batches of usable samples;
the last segment goes on past its stop when unusable samples left it short.

Plan: {"epoch", "first", "streams": [{"segments": [...], "batches": n}, ...]}. Batch b of the plan (from
0) comes from logical worker (first + b) mod W, W = len(streams): the DataLoader takes batches from its
workers round-robin starting at worker 0, so DataLoader worker j plays logical worker (first + j) mod W.
At a fresh epoch start first = 0 and logical worker w reads source stream (world, rank, W, w) from 0.
"""

from __future__ import annotations

import copy

VERSION = 1


def share(total: int, worker: int, workers: int) -> int:
    """Batches among the first `total` of a round-robin over `workers` that fall on `worker`."""
    return total // workers + (1 if worker < total % workers else 0)


def epoch_plan(epoch: int, rank: int, world: int, workers: int, num_batches: int) -> dict:
    streams = [
        {"segments": [[world, rank, workers, w, 0, None]], "batches": share(num_batches, w, workers)}
        for w in range(workers)
    ]
    return {"epoch": epoch, "first": 0, "streams": streams}


def advance(plan: dict, consumed: list[int], taken: list[int]) -> dict:
    """The plan after logical worker w made `taken[w]` batches out of the first `consumed[w]` raw samples of
    its segments: those are cut off the segments, and the round-robin goes on where it stopped."""
    out = copy.deepcopy(plan)
    workers = len(out["streams"])
    for stream, raw, batches in zip(out["streams"], consumed, taken, strict=True):
        stream["batches"] -= batches
        segments = stream["segments"]
        if not segments:
            continue
        while raw and len(segments) > 1 and raw >= segments[0][5] - segments[0][4]:
            raw -= segments[0][5] - segments[0][4]
            segments.pop(0)
        segments[0][4] += raw
        if segments[0][5] is not None and len(segments) == 1:
            segments[0][5] = max(segments[0][5], segments[0][4])
    out["first"] = (out["first"] + sum(taken)) % workers
    return out


def _remaining(stream: dict, batch_size: int) -> list[list]:
    """A stream's segments cut to exactly the raw samples its remaining batches need when every sample is
    usable (the last segment extended when short)."""
    need = stream["batches"] * batch_size
    out = []
    for k, seg in enumerate(stream["segments"]):
        if need <= 0:
            break
        length = need if k == len(stream["segments"]) - 1 else min(need, seg[5] - seg[4])
        out.append([*seg[:4], seg[4], seg[4] + length])
        need -= length
    return out


def remap(states: list[dict], rank: int, world: int, workers: int, batch_size: int) -> tuple[dict, int, int]:
    """This rank's plan for the rest of the interrupted epoch on a new layout, from every old rank's state.

    The old layout's remaining segments (rank by rank, logical worker by logical worker, each cut to what
    its remaining batches need) are concatenated and split into equal contiguous parts, one per new rank,
    each split over its workers in their round-robin shares; every rank gets the same batch count. The
    last (total mod world x batch_size) samples, fewer than one batch per rank, are left out of this
    epoch. Returns (plan, remaining samples of the old layout, samples left out).
    """
    pieces = [
        seg for st in states for stream in st["streams"] for seg in _remaining(stream, st["batch_size"])
    ]
    total = sum(seg[5] - seg[4] for seg in pieces)
    per_rank = total // (world * batch_size)
    wanted = [[] for _ in range(workers)]
    cursor = rank * per_rank * batch_size  # samples of the concatenation that go to lower ranks
    bounds = []
    for w in range(workers):
        n = share(per_rank, w, workers) * batch_size
        bounds.append((cursor, cursor + n))
        cursor += n
    offset = 0
    for seg in pieces:
        a, b = offset, offset + seg[5] - seg[4]
        for w, (lo, hi) in enumerate(bounds):
            if max(a, lo) < min(b, hi):
                wanted[w].append([*seg[:4], seg[4] + max(a, lo) - a, seg[4] + min(b, hi) - a])
        offset = b
    streams = [{"segments": segs, "batches": share(per_rank, w, workers)} for w, segs in enumerate(wanted)]
    plan = {"epoch": states[0]["epoch"], "first": 0, "streams": streams}
    return plan, total, total - per_rank * world * batch_size
