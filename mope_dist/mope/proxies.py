"""The proxy tasks Z of the MoPE metric, measured as integer counts so sums over ranks are exact.

Z is zero-shot top-1 accuracy on a labelled set (classification) or the mean of R@1/5/10 in both
directions on image-text pairs (retrieval). Counts (correct predictions, retrieval hits) add up
exactly over shards; Z is computed from the summed counts only, so every rank and every world size
sees the same number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)


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
        if self.labels.numel() and int(self.labels.max()) >= self.class_texts.shape[0]:
            raise ValueError(
                f"label {int(self.labels.max())} >= number of classes {self.class_texts.shape[0]}"
            )

    @property
    def num_counts(self) -> int:
        return 1

    def totals(self) -> Tensor:
        return torch.tensor([self.labels.shape[0]], dtype=torch.long)


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
        if self.text_to_image.numel() and int(self.text_to_image.max()) >= self.images.shape[0]:
            raise ValueError("text_to_image points past the last image")

    @property
    def num_counts(self) -> int:
        return 2 * len(RECALL_KS)

    def totals(self) -> Tensor:
        """Queries per direction: images with at least one text (image->text), all texts (text->image)."""
        with_text = torch.zeros(self.images.shape[0], dtype=torch.bool)
        with_text[self.text_to_image] = True
        n_i2t, n_t2i = int(with_text.sum()), self.texts.shape[0]
        return torch.tensor([n_i2t] * len(RECALL_KS) + [n_t2i] * len(RECALL_KS), dtype=torch.long)


Proxy = ClassificationProxy | RetrievalProxy


def z_from_counts(counts: Tensor, totals: Tensor) -> Tensor:
    """Z for each row of `counts` [..., num_counts]: accuracy, or mean recall over the six recalls."""
    return (counts.double() / totals.clamp(min=1).double()).mean(-1)


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


def count_correct(image_features: Tensor, classifier: Tensor, labels: Tensor) -> Tensor:
    """Top-1 correct counts [C] for image features [C|1, n, D] against class embeddings [C|1, K, D]."""
    logits = image_features.float() @ classifier.float().transpose(-1, -2)
    return (logits.argmax(-1) == labels).sum(-1)


def recall_hits(sims: Tensor, positives: Tensor) -> Tensor:
    """Hits at R@1/5/10 [C, 3] for similarities [C, n_queries, n_gallery] and a positive mask [n, G].

    A query's rank is the number of gallery items scoring strictly above its best positive (ties go
    in the query's favour); it hits at K when that rank is < K. Queries without a positive never hit.
    """
    best = sims.masked_fill(~positives, float("-inf")).amax(-1, keepdim=True)
    rank = (sims > best).sum(-1)
    valid = positives.any(-1)
    return torch.stack([((rank < k) & valid).sum(-1) for k in RECALL_KS], dim=-1)
