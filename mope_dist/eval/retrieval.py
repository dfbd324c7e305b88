"""Image-text retrieval recall (R@1/5/10 both ways) with several captions per image.

The set is small enough to hold whole on every rank (Flickr30k/COCO test: 1k-5k images, 5 captions
each). Under a process group each rank encodes one contiguous slice and the embeddings are assembled
with a sum all-reduce, so the ranks share the encoding work and all get the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mope_dist import dist
from mope_dist.model.runtime import autocast_context, eval_mode, model_dtype


def _encode_all(
    encode, inputs: torch.Tensor, batch_size: int, device: torch.device, dtype, autocast
) -> torch.Tensor:
    """Encode `inputs` split across ranks; returns the normalized fp32 embeddings of all rows on every rank.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in each): a
    rank whose slice is shorter, or empty when there are fewer rows than ranks, encodes row 0 and
    discards it."""
    n = inputs.shape[0]
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = n * rank // world, n * (rank + 1) // world
    longest = -(-n // world)  # ceil: slices differ by at most one row
    steps = -(-longest // batch_size)
    out = None
    for step in range(steps):
        i = lo + step * batch_size
        batch = inputs[i : min(i + batch_size, hi)] if i < hi else inputs[:1]
        batch = batch.to(device=device, non_blocking=True)
        if batch.is_floating_point():
            batch = batch.to(dtype)
        with autocast_context(device, autocast):
            feats = encode(batch, normalize=True).float()
        if out is None:
            out = torch.zeros(n, feats.shape[-1], dtype=torch.float32, device=device)
        if i < hi:
            out[i : i + feats.shape[0]] = feats
    return F.normalize(dist.all_reduce_sum(out), dim=-1)


def _hits(queries, query_ids, keys, key_ids, kmax: int, chunk: int) -> torch.Tensor:
    """[N_queries, kmax] bool: whether each query's j-th nearest key has the query's id (image index).
    The similarity matrix is built `chunk` queries at a time, so memory stays bounded on large sets."""
    out = []
    for i in range(0, queries.shape[0], chunk):
        top = (queries[i : i + chunk] @ keys.T).topk(kmax, dim=1).indices
        out.append(key_ids[top] == query_ids[i : i + chunk, None])
    return torch.cat(out)


def evaluate_retrieval(
    model: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    text_to_image: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 256,
    autocast: bool | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
) -> dict:
    """Recall of image->text and text->image retrieval.

    images [N_img, 3, H, W], texts [N_txt, ctx] token ids, text_to_image [N_txt] index of each caption's
    image. An image query hits if any of its captions is in the top k; images without a caption are
    no query (they still compete as text->image candidates). Every rank must call this with
    the same tensors. Returns {"i2t_R@1": ..., "t2i_R@1": ..., "mean_recall", n_images, n_texts,
    n_i2t_queries (images with a caption), seconds}; recalls are fractions of the queries.
    """
    device = torch.device(device)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    if texts.shape[0] != text_to_image.shape[0]:
        raise ValueError(f"{texts.shape[0]} texts but {text_to_image.shape[0]} text_to_image entries")
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise ValueError("retrieval evaluation needs at least one image and one text")
    if text_to_image.min() < 0 or text_to_image.max() >= images.shape[0]:
        raise ValueError(f"text_to_image indices must lie in [0, {images.shape[0]})")
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        img = _encode_all(model.encode_image, images, batch_size, device, model_dtype(model), autocast)
        txt = _encode_all(model.encode_text, texts, batch_size, device, None, autocast)
    owner = text_to_image.to(device)
    has_text = torch.zeros(images.shape[0], dtype=torch.bool, device=device)
    has_text[owner] = True
    queries = has_text.nonzero()[:, 0]  # images with a caption
    i2t = _hits(img[queries], queries, txt, owner, min(max(ks), len(txt)), chunk)
    t2i = _hits(txt, owner, img, torch.arange(len(img), device=device), min(max(ks), len(img)), chunk)
    out = {f"i2t_R@{k}": i2t[:, :k].any(1).float().mean().item() for k in ks}
    out |= {f"t2i_R@{k}": t2i[:, :k].any(1).float().mean().item() for k in ks}
    out["mean_recall"] = sum(out.values()) / len(out)
    out |= {
        "n_images": images.shape[0],
        "n_texts": texts.shape[0],
        "n_i2t_queries": len(queries),
    }
    out["seconds"] = time.perf_counter() - start
    return out
