"""Zero-shot classification and image-text retrieval evaluation, usable alone and inside training."""

from mope_dist.eval.retrieval import evaluate_retrieval
from mope_dist.eval.zeroshot import build_classifier, evaluate_zeroshot, topk_correct

__all__ = ["build_classifier", "evaluate_retrieval", "evaluate_zeroshot", "topk_correct"]
