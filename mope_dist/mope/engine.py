"""Distributed MoPE scoring: Z(model) - Z(model without unit) for every candidate unit, batched.

How it is cheap (compared with one full two-tower forward per candidate):
- Only the tower a candidate lives in is recomputed; the other tower's features (classifier or
  image features, retrieval gallery) are computed once.
- The stream entering layer l, and the unmasked pieces of block l, are computed once per micro-batch
  (advanced layer by layer); a candidate of layer l is finished from those pieces (a head reruns
  only the MLP half, a neuron group and a layer nothing), then runs the plain blocks after l, the
  last one on the pooled token only (mope_dist.mope.forward).
- `candidates_per_forward` candidates of one layer share a forward: their rows are stacked
  candidate-major. bf16 autocast on GPU.

How it is distributed (identical scores on every rank, for every world size):
- Samples are cut into fixed-size micro-batches of the global order, dealt round-robin to ranks
  (`local_batches`), so a sample's features are computed in the same batch shape whatever the
  world size and per-sample results are bitwise the same.
- Everything that must be seen whole (the classifier of a text candidate: every class under every
  template; a retrieval gallery) is assembled by a sum all-reduce of a zero-filled buffer in which
  each rank wrote only its own rows, which is an exact gather (x + 0 == x). Candidates are processed
  in passes whose buffers fit `gather_bytes`; every rank runs the same passes, so collectives match.
- Each rank counts only its own queries; ONE all-reduce of the integer matrix [1 + units, counts +
  fixed-point log-probability sums] gives exact totals, and Z and the mean log-probability (the
  tie-breaker, see proxies.py) are computed from the totals.
Retrieval therefore costs one feature gather per pass: each rank encodes only its share of the
changed tower, every rank ranks its own queries against the full gallery.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mope_dist import dist
from mope_dist.model.runtime import autocast_context, eval_mode, model_dtype
from mope_dist.mope.forward import StagedForward
from mope_dist.mope.proxies import (
    RECALL_KS,
    ClassificationProxy,
    Proxy,
    RetrievalProxy,
    classification_counts,
    local_batches,
    logp_from_sums,
    retrieval_counts,
    scale_of,
    z_from_counts,
)
from mope_dist.mope.report import ScoreResult
from mope_dist.mope.units import Unit, check_units, tower_of
from mope_dist.utils import get_logger

log = get_logger("mope")
_SIM_ELEMENTS = 1 << 26  # similarities ranked at once (256 MiB in fp32)


@dataclass
class _Stream:
    """One tower's proxy inputs and this rank's micro-batches of them (row ranges)."""

    inputs: Tensor
    batches: list[tuple[int, int]]


def _to(inputs: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    inputs = inputs.to(device, non_blocking=True)
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


def _encode(tower, inputs: Tensor) -> Tensor:
    """Normalised fp32 features of one micro-batch, unmasked."""
    return StagedForward(tower, inputs).features()


def _gather_rows(buffer: Tensor) -> Tensor:
    """Exact all-gather: every rank filled only its own rows of a zero buffer."""
    return dist.all_reduce_sum(buffer)


class _ClassificationScorer:
    """Z = top-1 accuracy; the text stream is the classifier's prompts, micro-batched by whole classes.
    Count columns: [correct, fixed-point sum of log p(label)]."""

    def __init__(self, proxy: ClassificationProxy, batch_size: int, rank: int, world: int, embed_dim: int):
        self.proxy, self.batch_size = proxy, batch_size
        k, m, ctx = proxy.class_texts.shape
        self.num_classes, self.num_templates, self.embed_dim = k, m, embed_dim
        classes_per_batch = max(1, batch_size // m)
        text_batches = [(s * m, e * m) for s, e in local_batches(k, classes_per_batch, rank, world)]
        self.streams = {
            "vision": _Stream(proxy.images, local_batches(proxy.images.shape[0], batch_size, rank, world)),
            "text": _Stream(proxy.class_texts.reshape(k * m, ctx), text_batches),
        }

    def base(self, model, device, dtype) -> Tensor:
        self.scale = scale_of(model).to(device)
        classifier = torch.zeros(self.num_classes, self.embed_dim, device=device)
        for s, e in self.streams["text"].batches:
            feats = _encode(model.text, _to(self.streams["text"].inputs[s:e], device, dtype))
            classifier[s // self.num_templates : e // self.num_templates] = self._class_embeddings(
                feats[None]
            )[0]
        self.classifier = _gather_rows(classifier)
        self.image_features = [
            _encode(model.visual, _to(self.streams["vision"].inputs[s:e], device, dtype))
            for s, e in self.streams["vision"].batches
        ]
        self.labels = [self.proxy.labels[s:e].to(device) for s, e in self.streams["vision"].batches]
        return self._counts(self.classifier[None])

    def _class_embeddings(self, feats: Tensor) -> Tensor:
        """[C, classes*templates, D] normalised prompt features -> [C, classes, D] (open_clip's recipe)."""
        c, rows, d = feats.shape
        emb = feats.view(c, rows // self.num_templates, self.num_templates, d).mean(2)
        return F.normalize(emb, dim=-1)

    def _counts(self, classifier: Tensor) -> Tensor:
        """Counts [C, 2] of this rank's images against classifiers [C, K, D], a few classifiers at a
        time so the [c, images, classes] logits stay small."""
        total = torch.zeros(classifier.shape[0], 2, dtype=torch.long, device=classifier.device)
        step = max(1, _SIM_ELEMENTS // max(1, self.batch_size * self.num_classes))
        for c0 in range(0, classifier.shape[0], step):
            for feats, labels in zip(self.image_features, self.labels, strict=True):
                total[c0 : c0 + step] += classification_counts(
                    feats[None], classifier[c0 : c0 + step], labels, self.scale
                )
        return total

    def gathered_rows(self, tower: str) -> int:
        return self.num_classes if tower == "text" else 0

    def start_pass(self, tower: str, n: int, device) -> None:
        if tower == "text":
            self.buffer = torch.zeros(n, self.num_classes, self.embed_dim, device=device)
        else:
            self.pass_counts = torch.zeros(n, 2, dtype=torch.long, device=device)

    def sink(self, tower: str, rows: slice, batch_index: int, batch: tuple[int, int], feats: Tensor) -> None:
        if tower == "text":
            s, e = batch
            self.buffer[rows, s // self.num_templates : e // self.num_templates] = self._class_embeddings(
                feats
            )
        else:
            self.pass_counts[rows] += classification_counts(
                feats, self.classifier[None], self.labels[batch_index], self.scale
            )

    def end_pass(self, tower: str) -> Tensor:
        if tower == "text":
            counts = self._counts(_gather_rows(self.buffer))
            del self.buffer
            return counts
        return self.pass_counts


class _RetrievalScorer:
    """Z = mean of R@1/5/10 image->text and text->image; both galleries are gathered whole.
    Count columns: hits at R@1/5/10 image->text, then text->image, then the fixed-point sums of the
    positives' log-probabilities image->text and text->image."""

    def __init__(self, proxy: RetrievalProxy, batch_size: int, rank: int, world: int, embed_dim: int):
        self.proxy, self.embed_dim, self.batch_size = proxy, embed_dim, batch_size
        n_img, n_txt = proxy.images.shape[0], proxy.texts.shape[0]
        self.streams = {
            "vision": _Stream(proxy.images, local_batches(n_img, batch_size, rank, world)),
            "text": _Stream(proxy.texts, local_batches(n_txt, batch_size, rank, world)),
        }
        self.rows = {"vision": n_img, "text": n_txt}

    def base(self, model, device, dtype) -> Tensor:
        self.scale = scale_of(model).to(device)
        self.t2i = self.proxy.text_to_image.to(device)
        self.base_features = {}
        for name in ("text", "vision"):
            buffer = torch.zeros(self.rows[name], self.embed_dim, device=device)
            for s, e in self.streams[name].batches:
                buffer[s:e] = _encode(
                    tower_of(model, name), _to(self.streams[name].inputs[s:e], device, dtype)
                )
            self.base_features[name] = _gather_rows(buffer)
        return self._counts(self.base_features["vision"][None], self.base_features["text"][None])

    def _counts(self, images: Tensor, texts: Tensor) -> Tensor:
        """Counts [C, 8] of this rank's queries; images [C|1, N_img, D], texts [C|1, N_txt, D].

        Candidates are ranked a few at a time so the [c, queries, gallery] similarities stay small."""
        c, k = max(images.shape[0], texts.shape[0]), len(RECALL_KS)
        hits = torch.zeros(c, 2 * k + 2, dtype=torch.long, device=images.device)
        i2t, t2i = [*range(k), 2 * k], [*range(k, 2 * k), 2 * k + 1]
        step = max(1, _SIM_ELEMENTS // max(1, self.batch_size * max(images.shape[1], texts.shape[1])))
        for c0 in range(0, c, step):
            img = images[c0 : c0 + step] if images.shape[0] > 1 else images
            txt = texts[c0 : c0 + step] if texts.shape[0] > 1 else texts
            for s, e in self.streams["vision"].batches:
                positives = self.t2i[None, :] == torch.arange(s, e, device=images.device)[:, None]
                hits[c0 : c0 + step, i2t] += retrieval_counts(img[:, s:e], txt, positives, self.scale)
            for s, e in self.streams["text"].batches:
                positives = (
                    self.t2i[s:e, None] == torch.arange(images.shape[1], device=images.device)[None, :]
                )
                hits[c0 : c0 + step, t2i] += retrieval_counts(txt[:, s:e], img, positives, self.scale)
        return hits

    def gathered_rows(self, tower: str) -> int:
        return self.rows[tower]

    def start_pass(self, tower: str, n: int, device) -> None:
        self.buffer = torch.zeros(n, self.rows[tower], self.embed_dim, device=device)

    def sink(self, tower: str, rows: slice, batch_index: int, batch: tuple[int, int], feats: Tensor) -> None:
        self.buffer[rows, batch[0] : batch[1]] = feats

    def end_pass(self, tower: str) -> Tensor:
        feats = _gather_rows(self.buffer)
        del self.buffer
        if tower == "vision":
            return self._counts(feats, self.base_features["text"][None])
        return self._counts(self.base_features["vision"][None], feats)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _passes(units: list[tuple[int, Unit]], rows: int, embed_dim: int, gather_bytes: int):
    """Split one tower's (id, unit) list, sorted by layer, into passes whose gather buffers fit."""
    per_pass = len(units) if rows == 0 else max(1, gather_bytes // (rows * embed_dim * 4))
    return [units[i : i + per_pass] for i in range(0, len(units), per_pass)]


def _chunks(pass_units: list[tuple[int, Unit]], per_forward: int):
    """(layer, [(position in pass, id, unit)]) forwards of at most `per_forward` same-layer candidates."""
    by_layer = defaultdict(list)
    for pos, (i, u) in enumerate(pass_units):
        by_layer[u.layer].append((pos, i, u))
    return [
        (layer, group[j : j + per_forward])
        for layer, group in sorted(by_layer.items())
        for j in range(0, len(group), per_forward)
    ]


def _pass_cost(chunks, n_layers: int, rows: int) -> float:
    """About the block-rows one micro-batch of `rows` rows costs in a pass: the unmasked stream up to
    the deepest layer, then per candidate the blocks after its layer (and a head's MLP half)."""
    prefix = 1 + max((layer for layer, _ in chunks), default=0)
    per_candidate = sum(
        n_layers - 1 - layer + (2 / 3 if u.kind == "head" else 0) for layer, c in chunks for _, _, u in c
    )
    return rows * (prefix + per_candidate)


def _estimate_seconds(model, plan, streams, device, dtype) -> float:
    """Time each tower's first forward (prefix + first chunk, after the base pass warmed up) and
    scale by block-rows."""
    total = 0.0
    for name, passes in plan:
        tower, stream = tower_of(model, name), streams[name]
        if not stream.batches:
            continue
        (layer, chunk), (s, e) = passes[0][1][0], stream.batches[0]
        t0 = _now(device)
        StagedForward(tower, _to(stream.inputs[s:e], device, dtype)).candidate_features(
            [u for *_, u in chunk]
        )
        seconds = _now(device) - t0
        rate = seconds / _pass_cost([(layer, chunk)], len(tower.blocks), e - s)
        total += rate * sum(
            _pass_cost(chunks, len(tower.blocks), e - s) for _, chunks in passes for s, e in stream.batches
        )
    return total


def score_mope(
    model,
    units: Sequence[Unit],
    proxy: Proxy,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    candidates_per_forward: int = 8,
    autocast: bool | None = None,
    gather_bytes: int = 1 << 30,
    progress: bool = True,
) -> ScoreResult:
    """MoPE score of every unit: Z(model) - Z(model without the unit), identical on every rank, and
    the same drop of the mean log-probability of the correct class / matching pair (`logp_drop`, the
    tie-breaker).

    Every rank must call this with the same model, units and proxy tensors (the full proxy set; each
    rank encodes only its micro-batches). `batch_size` samples per micro-batch (classification
    prompts: whole classes, about `batch_size` prompts); a forward holds candidates_per_forward *
    batch_size rows. `autocast` None means bf16 on GPU, exact fp32 on CPU. Retrieval gathers the
    changed tower's features in passes of at most `gather_bytes` per rank.
    """
    device = torch.device(device)
    units = list(units)
    check_units(model, units)
    if candidates_per_forward < 1 or batch_size < 1:
        raise ValueError("batch_size and candidates_per_forward must be >= 1")
    rank, world = dist.get_rank(), dist.get_world_size()
    embed_dim = model.spec.embed_dim
    scorer_cls = _ClassificationScorer if isinstance(proxy, ClassificationProxy) else _RetrievalScorer
    scorer = scorer_cls(proxy, batch_size, rank, world, embed_dim)
    dtype = model_dtype(model)
    start = time.perf_counter()

    with eval_mode(model), torch.inference_mode(), autocast_context(device, autocast):
        width = proxy.num_counts + proxy.num_logp
        counts = torch.zeros(1 + len(units), width, dtype=torch.long, device=device)
        counts[0] = scorer.base(model, device, dtype)[0]

        plan = []  # per tower: passes (units whose gathered outputs fit in memory) and their forwards
        for name in ("vision", "text"):
            tower_units = sorted(((i + 1, u) for i, u in enumerate(units) if u.tower == name), key=_layer_key)
            if tower_units:
                rows = scorer.gathered_rows(name)
                passes = _passes(tower_units, rows, embed_dim, gather_bytes)
                plan.append((name, [(p, _chunks(p, candidates_per_forward)) for p in passes]))
        total_cost = sum(
            _pass_cost(chunks, len(tower_of(model, name).blocks), e - s)
            for name, passes in plan
            for _, chunks in passes
            for s, e in scorer.streams[name].batches
        )
        if rank == 0 and progress:
            log.info(
                "MoPE: scoring %d units on %d rank(s) with a %s proxy; estimated %s (timed on a first chunk)",
                len(units),
                world,
                proxy.kind,
                _fmt_seconds(_estimate_seconds(model, plan, scorer.streams, device, dtype)),
            )
        bar = tqdm(
            total=total_cost,
            desc="MoPE",
            disable=not (progress and rank == 0),
            bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]",
        )
        for name, passes in plan:
            tower, stream = tower_of(model, name), scorer.streams[name]
            for pass_units, chunks in passes:
                scorer.start_pass(name, len(pass_units), device)
                for b, (s, e) in enumerate(stream.batches):
                    forward = StagedForward(tower, _to(stream.inputs[s:e], device, dtype))
                    for _, chunk in chunks:
                        feats = forward.candidate_features([u for *_, u in chunk])
                        first = chunk[0][0]
                        scorer.sink(name, slice(first, first + len(chunk)), b, (s, e), feats)
                    bar.update(_pass_cost(chunks, len(tower.blocks), e - s))
                counts[[i for i, _ in pass_units]] = scorer.end_pass(name)
        bar.close()
        dist.all_reduce_sum(counts)

    totals = proxy.totals().to(device)
    z = z_from_counts(counts[:, : proxy.num_counts], totals).tolist()
    logp = logp_from_sums(counts[:, proxy.num_counts :], proxy.logp_totals().to(device)).tolist()
    counts = counts[:, : proxy.num_counts].cpu().tolist()
    elapsed = time.perf_counter() - start
    if rank == 0 and progress:
        log.info(
            "MoPE: base Z=%.4f (mean log-probability %.4f); %d units scored in %s (%.1f units/s)",
            z[0],
            logp[0],
            len(units),
            _fmt_seconds(elapsed),
            len(units) / elapsed,
        )
    return ScoreResult(
        method="mope",
        units=units,
        scores=[z[0] - zi for zi in z[1:]],
        z=z[1:],
        counts=counts[1:],
        base_z=z[0],
        base_counts=counts[0],
        logp=logp[1:],
        logp_drop=[logp[0] - lp for lp in logp[1:]],
        base_logp=logp[0],
        meta={
            "proxy": proxy.kind,
            "totals": totals.tolist(),
            "world_size": world,
            "batch_size": batch_size,
            "candidates_per_forward": candidates_per_forward,
            "seconds": elapsed,
        },
    )


def _layer_key(item: tuple[int, Unit]) -> int:
    return item[1].layer


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"
