"""Config sections -> the data the phases read: the training loader, the scoring proxy set, and the
evaluators used during and after training. A set that cannot be used is a ConfigError naming its key,
raised when it is built (before any expensive phase)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mope_dist.config import Config, EvalConfig, ProxyConfig
from mope_dist.data import (
    ImageTextLoader,
    load_classnames,
    load_retrieval_set,
    load_templates,
    make_image_text_loader,
    make_labelled_loader,
)
from mope_dist.data.device import ImageNormalizer, split_decode, split_normalize
from mope_dist.errors import ConfigError
from mope_dist.eval.retrieval import evaluate_retrieval
from mope_dist.eval.zeroshot import build_classifier, evaluate_zeroshot
from mope_dist.mope.proxies import ClassificationProxy, RetrievalProxy, class_text_tokens


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Per-rank batch of one micro-step: the global batch split over ranks and accumulation steps."""
    parts = world_size * cfg.distill.grad_accum
    if cfg.data.batch_size % parts:
        raise SystemExit(
            f"config error: data.batch_size={cfg.data.batch_size} is not divisible by world size {world_size} "
            f"x distill.grad_accum {cfg.distill.grad_accum}"
        )
    return cfg.data.batch_size // parts


class TrainData(NamedTuple):
    loader: ImageTextLoader
    normalize: ImageNormalizer | None  # uint8 batches: normalised on the device by the trainer


def train_loader(cfg: Config, preprocess, tokenizer, world_size: int) -> TrainData:
    """With data.image_dtype uint8 the workers stop before ToTensor/Normalize and the trainer
    normalises on the device (a quarter of the bytes to move per batch); with data.decode device they
    also leave JPEG decoding and cropping to the device."""
    normalize = None
    if cfg.data.image_dtype == "uint8":
        preprocess, normalize = split_normalize(preprocess)
    if cfg.data.decode == "device":  # (config validation: image_dtype is uint8)
        try:
            preprocess, normalize.decoder = split_decode(preprocess)
        except ValueError as e:
            raise ConfigError(f"data.decode=device: {e}") from e
    loader = make_image_text_loader(
        cfg.data.train_shards,
        preprocess,
        tokenizer,
        batch_size=micro_batch_size(cfg, world_size),
        num_workers=cfg.data.workers,
        mode=cfg.data.mode,
        seed=cfg.data.seed,
        samples_per_epoch=cfg.data.samples_per_epoch,
        pin_memory=torch.cuda.is_available(),
    )
    if cfg.data.decode == "device":
        normalize.decoder.on_replaced = loader.count_unusable
    return TrainData(loader, normalize)


def build_proxy(section: ProxyConfig, preprocess, tokenizer) -> ClassificationProxy | RetrievalProxy:
    """The whole proxy set in memory on every rank (the scorer shards its batches over ranks).
    An unusable set (no images, class names that do not fit) is a ConfigError naming mope.proxy."""
    try:
        return _build_proxy(section, preprocess, tokenizer)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"mope.proxy ({section.data}): {e}") from e


def _build_proxy(section: ProxyConfig, preprocess, tokenizer) -> ClassificationProxy | RetrievalProxy:
    if section.kind == "retrieval":
        images, texts, text_to_image = load_retrieval_set(section.data, preprocess, tokenizer)
        return RetrievalProxy(images, texts, text_to_image)
    classnames = load_classnames(section.classnames)
    loader = make_labelled_loader(
        section.data,
        preprocess,
        section.batch_size,
        rank=0,
        world_size=1,
        max_per_class=section.max_per_class,
        classnames=classnames,
    )
    images, labels = zip(*loader, strict=True)
    class_texts = class_text_tokens(classnames, load_templates(section.templates), tokenizer)
    return ClassificationProxy(torch.cat(images), torch.cat(labels), class_texts)


def zeroshot_evaluator(section: EvalConfig, preprocess, tokenizer, device):
    """`evaluate(model) -> {top1, top5}` on this rank's part of the eval set; collective on every rank.
    An unusable set is a ConfigError naming eval.data, raised here (before training)."""
    try:
        classnames = load_classnames(section.classnames)
        templates = load_templates(section.templates)
        loader = make_labelled_loader(
            section.data,
            preprocess,
            section.batch_size,
            max_per_class=section.max_per_class,
            num_workers=section.workers,
            classnames=classnames,
        )
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"eval ({section.data}): {e}") from e

    def evaluate(model) -> dict:
        classifier = build_classifier(model, classnames, templates, tokenizer, device)
        result = evaluate_zeroshot(model, loader, classifier, device, progress=False)
        return {"top1": result["top1"], "top5": result["top5"]}

    return evaluate


def retrieval_evaluator(shards: str, preprocess, tokenizer, device, batch_size: int):
    """`evaluate(model) -> {i2t_R@k, t2i_R@k, mean_recall}` on a retrieval set loaded once; collective."""
    data = load_retrieval_set(shards, preprocess, tokenizer)

    def evaluate(model) -> dict:
        result = evaluate_retrieval(model, *data, device, batch_size=batch_size)
        return {k: v for k, v in result.items() if "R@" in k or k == "mean_recall"}

    return evaluate
