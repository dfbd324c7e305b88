"""The obviously-correct MoPE reference the engine is tested and benchmarked against.

For every unit: physically slice it out (mope_dist.model.slice_model) and evaluate the whole sliced
model with mope_dist.eval, exactly as a user would evaluate a pruned model; the mean log-probability
of the correct class (or of the matching pair, each retrieval direction) comes from the plainly
computed logits of all samples at once. One full two-tower evaluation per unit; single process only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mope_dist import dist
from mope_dist.eval import evaluate_retrieval, evaluate_zeroshot
from mope_dist.model import slice_model
from mope_dist.mope.proxies import RECALL_KS, ClassificationProxy, Proxy, scale_of, z_from_counts
from mope_dist.mope.report import ScoreResult
from mope_dist.mope.units import Unit, check_units, keep_without


@torch.inference_mode()
def proxy_counts(model, proxy: Proxy, device: torch.device | str = "cpu", batch_size: int = 64) -> list[int]:
    """The proxy's integer counts for a whole model, via the evaluation module."""
    model = model.to(device).eval()
    if isinstance(proxy, ClassificationProxy):
        k, m, ctx = proxy.class_texts.shape
        tokens = proxy.class_texts.reshape(k * m, ctx)
        feats = torch.cat(
            [
                model.encode_text(tokens[i : i + batch_size].to(device), normalize=True)
                for i in range(0, k * m, batch_size)
            ]
        )
        classifier = F.normalize(feats.view(k, m, -1).mean(1), dim=-1).T
        batches = [
            (proxy.images[i : i + batch_size], proxy.labels[i : i + batch_size])
            for i in range(0, proxy.images.shape[0], batch_size)
        ]
        out = evaluate_zeroshot(model, batches, classifier, device, autocast=False, progress=False)
        return [round(out["top1"] * out["n"])]
    out = evaluate_retrieval(
        model, proxy.images, proxy.texts, proxy.text_to_image, device, batch_size=batch_size, autocast=False
    )
    n_i2t, n_t2i = out["n_i2t_queries"], proxy.texts.shape[0]  # recalls are fractions of the queries
    return [round(out[f"i2t_R@{k}"] * n_i2t) for k in RECALL_KS] + [
        round(out[f"t2i_R@{k}"] * n_t2i) for k in RECALL_KS
    ]


@torch.inference_mode()
def proxy_logp(model, proxy: Proxy, device: torch.device | str = "cpu") -> float:
    """Mean log-probability of the correct class (classification) or, averaged over both directions,
    of each query's positives (retrieval), from whole-set features of `model`."""
    model = model.to(device).eval()
    scale = scale_of(model)
    images = model.encode_image(proxy.images.to(device), normalize=True).float()
    if isinstance(proxy, ClassificationProxy):
        k, m, ctx = proxy.class_texts.shape
        text = model.encode_text(proxy.class_texts.reshape(k * m, ctx).to(device), normalize=True).float()
        classifier = F.normalize(text.view(k, m, -1).mean(1), dim=-1)
        logp = (scale * images @ classifier.T).log_softmax(-1)
        return float(logp[torch.arange(len(proxy.labels)), proxy.labels.to(device)].double().mean())
    texts = model.encode_text(proxy.texts.to(device), normalize=True).float()
    t2i = proxy.text_to_image.to(device)
    positives = t2i[None, :] == torch.arange(images.shape[0], device=device)[:, None]  # [images, texts]
    i2t = (scale * images @ texts.T).log_softmax(-1).masked_fill(~positives, float("-inf")).logsumexp(-1)
    i2t = i2t[positives.any(-1)].double().mean()
    t2i_logp = (scale * texts @ images.T).log_softmax(-1)[torch.arange(len(t2i)), t2i].double().mean()
    return float((i2t + t2i_logp) / 2)


def score_mope_naive(
    model,
    units: Sequence[Unit],
    proxy: Proxy,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    logp: bool = True,
) -> ScoreResult:
    """MoPE scores by slicing out one unit at a time and evaluating the full sliced model; with
    `logp`, also the log-probability tie-breaker (a second, separate evaluation per unit)."""
    if dist.get_world_size() > 1:
        raise RuntimeError("the naive reference runs in a single process")
    units = list(units)
    check_units(model, units)
    rows, means = [], []
    for unit in [None, *units]:
        m = model if unit is None else slice_model(model, keep_without(model, unit))
        rows.append(proxy_counts(m, proxy, device, batch_size))
        means += [proxy_logp(m, proxy, device)] if logp else []
    z = z_from_counts(torch.tensor(rows), proxy.totals()).tolist()
    return ScoreResult(
        method="mope",
        units=units,
        scores=[z[0] - zi for zi in z[1:]],
        z=z[1:],
        counts=rows[1:],
        base_z=z[0],
        base_counts=rows[0],
        logp=means[1:] if logp else None,
        logp_drop=[means[0] - lp for lp in means[1:]] if logp else None,
        base_logp=means[0] if logp else None,
        meta={"proxy": proxy.kind, "totals": proxy.totals().tolist(), "world_size": 1, "reference": "naive"},
    )
