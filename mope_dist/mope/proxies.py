"""The proxy tasks Z of the MoPE metric, measured as integer counts so sums over ranks are exact.

Z is zero-shot top-1 accuracy on a labelled set (classification) or the mean of R@1/5/10 in both
directions on image-text pairs (retrieval). Counts (correct predictions, retrieval hits) add up
exactly over shards; Z is computed from the summed counts only, so every rank and every world size
sees the same number.

Beside Z, the same logits give a continuous proxy, the mean log-probability (under the model's
logit scale) of the correct class, or of the matching pair in each retrieval direction. Removing one
module often changes no top-1 prediction, so Z ties; this value still moves and breaks the ties.
Each sample's log-probability is rounded to a fixed point (LOGP_UNIT) and summed as an integer, so
it too adds up exactly, in any order, over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
LOGP_UNIT = 2.0**-20  # fixed-point resolution of a per-sample log-probability (nats)


@dataclass
class ClassificationProxy:
    """Labelled images plus the zero-shot classifier's texts (every class under every template)."""

    images: Tensor  # [N, 3, H, W], already preprocessed
    labels: Tensor  # [N] class indices
    class_texts: Tensor  # [K, M, context] token ids: M templates for each of K classes

    kind = "classification"

    def __post_init__(self):
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.class_texts.dim() != 3:
            raise ValueError(
                f"class_texts must be [classes, templates, context], got {tuple(self.class_texts.shape)}"
            )
        if self.labels.numel() and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(
            self.class_texts
        ):
            raise ValueError(f"labels must lie in [0, {len(self.class_texts)}), the classes")

    @property
    def num_counts(self) -> int:
        return 1

    @property
    def num_logp(self) -> int:
        return 1

    def totals(self) -> Tensor:
        return torch.tensor([self.labels.shape[0]], dtype=torch.long)

    def logp_totals(self) -> Tensor:
        return self.totals()


@dataclass
class RetrievalProxy:
    """Image-text pairs; several texts may share one image (COCO-style captions)."""

    images: Tensor  # [N_img, 3, H, W]
    texts: Tensor  # [N_txt, context] token ids
    text_to_image: Tensor  # [N_txt] index of each text's image

    kind = "retrieval"

    def __post_init__(self):
        if self.texts.shape[0] != self.text_to_image.shape[0]:
            raise ValueError(
                f"{self.texts.shape[0]} texts but {self.text_to_image.shape[0]} text_to_image entries"
            )
        t2i = self.text_to_image
        if t2i.numel() and not 0 <= int(t2i.min()) <= int(t2i.max()) < self.images.shape[0]:
            raise ValueError(f"text_to_image indices must lie in [0, {self.images.shape[0]}), the images")

    @property
    def num_counts(self) -> int:
        return 2 * len(RECALL_KS)

    @property
    def num_logp(self) -> int:
        return 2

    def totals(self) -> Tensor:
        """Queries per direction: images with at least one text (image->text), all texts (text->image)."""
        n_i2t, n_t2i = self.logp_totals().tolist()
        return torch.tensor([n_i2t] * len(RECALL_KS) + [n_t2i] * len(RECALL_KS), dtype=torch.long)

    def logp_totals(self) -> Tensor:
        """[image->text queries, text->image queries]."""
        with_text = torch.zeros(self.images.shape[0], dtype=torch.bool)
        with_text[self.text_to_image] = True
        return torch.tensor([int(with_text.sum()), self.texts.shape[0]], dtype=torch.long)


Proxy = ClassificationProxy | RetrievalProxy


def z_from_counts(counts: Tensor, totals: Tensor) -> Tensor:
    """Z for each row of `counts` [..., num_counts]: accuracy, or mean recall over the six recalls."""
    return (counts.double() / totals.clamp(min=1).double()).mean(-1)


def logp_from_sums(sums: Tensor, totals: Tensor) -> Tensor:
    """Mean log-probability for each row of fixed-point sums [..., num_logp] (mean over directions)."""
    return (sums.double() * LOGP_UNIT / totals.clamp(min=1).double()).mean(-1)


def fixed_point(logp: Tensor) -> Tensor:
    """Per-sample log-probabilities -> int64 multiples of LOGP_UNIT (exact, order-free sums)."""
    return torch.round(logp.double() / LOGP_UNIT).long()


def scale_of(model) -> Tensor:
    """The logit scale the model's own contrastive softmax uses (clamped at 100, like its forward)."""
    return model.logit_scale.detach().float().exp().clamp(max=100.0)


def class_text_tokens(
    classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]], tokenizer
) -> Tensor:
    """Tokens [K, M, context] for every class under every template (format strings or callables)."""
    texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    tokens = tokenizer(texts)
    return tokens.view(len(classnames), len(templates), -1)


def local_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's micro-batches: fixed-size blocks of the global order, dealt round-robin.

    Every sample lands in the same block (same rows, same batch shape) whatever the world size, so
    the per-sample floating-point results, and hence the counts, do not depend on the world size.
    """
    return [(s, min(s + batch_size, n)) for s in range(rank * batch_size, n, world_size * batch_size)]


def classification_counts(
    image_features: Tensor, classifier: Tensor, labels: Tensor, scale: Tensor
) -> Tensor:
    """[C, 2]: top-1 correct count and fixed-point sum of log p(label) for image features [C|1, n, D]
    against class embeddings [C|1, K, D]. In fp32 even under the encoders' bf16 autocast, whose
    rounding would tie close classes."""
    with torch.autocast(image_features.device.type, enabled=False):
        logits = image_features.float() @ classifier.float().transpose(-1, -2)
        correct = (logits.argmax(-1) == labels).sum(-1)
        logp = (scale * logits).log_softmax(-1).gather(-1, labels.expand(logits.shape[:-1])[..., None])
    return torch.stack([correct, fixed_point(logp[..., 0]).sum(-1)], dim=-1)


def retrieval_counts(queries: Tensor, gallery: Tensor, positives: Tensor, scale: Tensor) -> Tensor:
    """[C, 4]: hits at R@1/5/10 and the fixed-point sum of log p(positives) for query features
    [C|1, n, D] against gallery features [C|1, G, D] and a positive mask [n, G]; the similarities in
    fp32 even under the encoders' bf16 autocast.

    A query's rank is the number of gallery items other than its positives scoring at least as high as
    its best positive (ties go against the query: features collapsed by a removed module must not
    rank every query first); it hits at K when that rank is < K. Its log-probability is that of all
    its positives together under the softmax over the gallery. Queries without a positive count
    nothing.
    """
    with torch.autocast(queries.device.type, enabled=False):
        sims = queries.float() @ gallery.float().transpose(-1, -2)
        best = sims.masked_fill(~positives, float("-inf")).amax(-1, keepdim=True)
        rank = (sims > best).sum(-1) + ((sims == best) & ~positives).sum(-1)
        valid = positives.any(-1)
        hits = [((rank < k) & valid).sum(-1) for k in RECALL_KS]
        logp = (scale * sims).log_softmax(-1).masked_fill(~positives, float("-inf")).logsumexp(-1)
        logp = fixed_point(logp.masked_fill(~valid, 0.0)).sum(-1)
    return torch.stack([*hits, logp], dim=-1)
