"""Zero-shot classification: class embeddings from prompts, then top-k accuracy over a labelled loader.

Works on any model with open_clip's `encode_image` / `encode_text(normalize=...)` (an open_clip CLIP, a
PrunableCLIP, a DeepSpeed engine wrapping one). Called alone by tools/eval_zeroshot.py and periodically
inside training, so these are plain functions that restore the model's train/eval mode. They use
no_grad, not inference_mode: ZeRO-3 fetches parameters during the forward, and inference tensors
written into them would break its later in-place updates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import open_clip
import torch
from tqdm import tqdm

from mope_dist import dist
from mope_dist.model.runtime import autocast_context, eval_mode, model_dtype


def build_classifier(
    model: torch.nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    tokenizer: Callable,
    device: torch.device | str,
    autocast: bool | None = None,
    num_classes_per_batch: int = 10,
) -> torch.Tensor:
    """Class weights [embed_dim, num_classes] in fp32: mean of normalized prompt embeddings, renormalized.

    Thin wrapper over open_clip.build_zero_shot_classifier so numbers match open_clip's own eval.
    """
    if len(classnames) == 0:
        raise ValueError("no class names given")
    if len(templates) == 0:
        raise ValueError("no templates given")
    device = torch.device(device)
    with eval_mode(model), torch.no_grad(), autocast_context(device, autocast):
        weights = open_clip.build_zero_shot_classifier(
            model,
            tokenizer=tokenizer,
            classnames=list(classnames),
            templates=list(templates),
            num_classes_per_batch=num_classes_per_batch,
            device=device,
        )
    return weights.float()


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> list[torch.Tensor]:
    """Number of rows whose label is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    pred = logits.topk(kmax, dim=-1).indices
    hit = pred.eq(labels.view(-1, 1))
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def lockstep(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (images, labels) until every rank's part is used up; a rank that runs out first gets
    one-image zero batches with labels None meanwhile. Every rank thus runs the same forwards, which
    ZeRO-3 needs (its forward gathers parameters collectively) and the labelled loader's parts, which
    may differ by a batch, do not give. One 4-number all-reduce per batch; a plain loop in one process."""
    if dist.get_world_size() == 1:
        yield from loader
        return
    it = iter(loader)
    while True:
        batch = next(it, None)
        shape = [1, *batch[0].shape[1:]] if batch is not None else [0, 0, 0, 0]
        live = dist.all_reduce_sum(torch.tensor(shape, dtype=torch.int64, device=device))
        if live[0] == 0:
            return
        yield batch if batch is not None else (torch.zeros(1, *(live[1:] // live[0]).tolist()), None)


def evaluate_zeroshot(
    model: torch.nn.Module,
    loader: Iterable,
    classifier: torch.Tensor,
    device: torch.device | str,
    autocast: bool | None = None,
    progress: bool = True,
    desc: str = "zero-shot",
) -> dict:
    """Top-1/top-5 accuracy of `classifier` on (images, labels) batches from `loader`.

    Under a process group each rank passes its own disjoint part of the set; the correct counts are
    summed over ranks, so every sample counts once whatever the set size. Every rank must call this
    (see `lockstep`) and every rank gets the same result. Returns
    {top1, top5, n, seconds, images_per_s} (accuracies as fractions; with <= 5 classes top5 is 1.0).
    """
    device = torch.device(device)
    dtype = model_dtype(model)
    weights = classifier.to(device=device, dtype=torch.float32)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, n
    total = getattr(loader, "num_samples", None)  # this rank's images, when the loader knows it
    bar = tqdm(total=total, desc=desc, unit="img", disable=not (progress and dist.is_main()), leave=False)
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        for images, labels in lockstep(loader, device):
            images = images.to(device=device, dtype=dtype, non_blocking=True)
            with autocast_context(device, autocast):
                features = model.encode_image(images, normalize=True)
            if labels is None:  # this rank's part is done; the forward only kept step with the others
                continue
            labels = labels.to(device=device, non_blocking=True)
            logits = features.float() @ weights
            top1, top5 = topk_correct(logits, labels, (1, 5))
            counts += torch.stack([top1, top5, torch.tensor(labels.numel(), device=device)]).to(counts.dtype)
            bar.update(labels.numel())
    bar.close()
    dist.all_reduce_sum(counts)
    seconds = time.perf_counter() - start  # measured after the collective: the slowest rank's time
    top1, top5, n = (float(c) for c in counts.tolist())
    if n == 0:
        raise ValueError("zero-shot evaluation saw no samples")
    return {"top1": top1 / n, "top5": top5 / n, "n": int(n), "seconds": seconds, "images_per_s": n / seconds}
