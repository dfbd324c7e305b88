"""Distillation losses: CLIP contrastive, cross-modal KD, embedding MSE and hidden-state MSE.

Every term has a weight (config.LossWeights, distill.losses); a weight of 0 skips its computation
(and the teacher/hidden work it needs). `make_loss` builds the loss a DistillConfig describes;
`HiddenRecorder` collects the block outputs the hidden-state term reads.

Distributed semantics follow open_clip's `ClipLoss`: features are all-gathered so the similarity
matrices cover the GLOBAL batch.
- `gather_with_grad=False`: gathered copies carry no gradient; with `local_loss=False` the
  rank's own slice is replaced by its local (grad-carrying) features, so every rank computes the same
  global loss value and its gradient reaches only the local features.
- `gather_with_grad=True`: `torch.distributed.nn.all_gather`, gradients flow back to every rank.
- `local_loss=True`: each rank computes only its own rows (local features against all gathered
  columns), labels offset by rank; the mean over ranks equals the global loss.
The cross-modal KD term uses exactly the same logit layout as the contrastive term.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.distributed.nn  # autograd-aware all_gather for gather_with_grad
import torch.nn.functional as F
from torch import Tensor

from mope_dist.config import DistillConfig, LossWeights
from mope_dist.dist import get_rank, get_world_size

LOSS_TERMS = ("contrastive", "kd", "embed", "hidden")


@dataclass
class CLIPOutputs:
    """What the losses read from a model forward (student or teacher)."""

    image: Tensor  # [N, D] L2-normalised image embeddings
    text: Tensor  # [N, D] L2-normalised text embeddings
    logit_scale: Tensor  # scalar, already exp()'d (and clamped)
    image_hidden: list[Tensor] | None = None  # per kept layer, [N, T, W]
    text_hidden: list[Tensor] | None = None


def gather_features(features: Tensor, local_loss: bool = False, gather_with_grad: bool = False) -> Tensor:
    """Concatenate `features` from every rank in rank order (open_clip's gather_features)."""
    world_size = get_world_size()
    if world_size == 1:
        return features
    if gather_with_grad:
        return torch.cat(torch.distributed.nn.all_gather(features), dim=0)
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    tdist.all_gather(gathered, features.contiguous())
    if not local_loss:
        gathered[get_rank()] = features  # keep the gradient path for the local slice
    return torch.cat(gathered, dim=0)


def pair_logits(
    image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor, local_loss: bool
) -> tuple[Tensor, Tensor]:
    """(logits_per_image, logits_per_text) over the global batch; local rows only if `local_loss`."""
    if local_loss:
        return scale * image @ all_text.T, scale * text @ all_image.T
    logits_per_image = scale * all_image @ all_text.T
    return logits_per_image, logits_per_image.T


def contrastive_loss(logits_per_image: Tensor, logits_per_text: Tensor, local_loss: bool) -> Tensor:
    """Symmetric InfoNCE: matching pairs sit on the (rank-offset, if local) diagonal."""
    n = logits_per_image.shape[0]
    labels = torch.arange(n, device=logits_per_image.device)
    if local_loss:
        labels = labels + n * get_rank()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over rows.

    KL rather than soft cross-entropy: same gradient, but it is 0 when the student matches the teacher.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    return kl * temperature**2


def cross_modal_kd(
    student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], temperature: float
) -> Tensor:
    """Mean of the image->text and text->image KD terms; logits use each model's own logit scale."""
    return (soft_kl(student[0], teacher[0], temperature) + soft_kl(student[1], teacher[1], temperature)) / 2


def embedding_mse(student: CLIPOutputs, teacher: CLIPOutputs) -> Tensor:
    """MSE (mean over elements) between normalised embeddings, averaged over the two modalities.

    Mean over elements makes the term ~|s - t|^2 / D, so useful weights are large (CLIP-KD uses ~1e3).
    """
    image = F.mse_loss(student.image.float(), teacher.image.float())
    return (image + F.mse_loss(student.text.float(), teacher.text.float())) / 2


def layer_map(student_source_layers: list[int], teacher_source_layers: list[int]) -> list[int]:
    """Teacher hidden-state index for each kept student layer (both lists are original layer ids)."""
    position = {src: i for i, src in enumerate(teacher_source_layers)}
    missing = [s for s in student_source_layers if s not in position]
    if missing:
        raise ValueError(
            f"student layers come from teacher layers {missing}, which the teacher does not have"
        )
    return [position[s] for s in student_source_layers]


def hidden_mse(
    student_hidden: list[Tensor], teacher_hidden: list[Tensor], teacher_index: list[int]
) -> list[Tensor]:
    """Per-layer MSE between each student block output and the teacher block it was cut from."""
    if len(student_hidden) != len(teacher_index):
        raise ValueError(
            f"{len(student_hidden)} student hidden states but {len(teacher_index)} mapped layers"
        )
    return [
        F.mse_loss(s.float(), teacher_hidden[j].float())
        for s, j in zip(student_hidden, teacher_index, strict=True)
    ]


class DistillLoss:
    """Weighted sum of the four terms. Returns (total, {term: detached value}) for logging.

    `image_layers` / `text_layers`: teacher hidden index per student layer (see `layer_map`); needed
    only when `weights.hidden > 0`. With no teacher only the contrastive term is computed.
    """

    def __init__(
        self,
        weights: LossWeights,
        *,
        local_loss: bool,
        gather_with_grad: bool,
        image_layers: list[int] | None = None,
        text_layers: list[int] | None = None,
    ):
        self.weights = {k: getattr(weights, k) for k in LOSS_TERMS}
        if min(self.weights.values()) < 0 or weights.kd_temperature <= 0:
            raise ValueError("loss weights must be >= 0 and kd_temperature > 0")
        if max(self.weights.values()) == 0:
            raise ValueError("at least one loss weight must be > 0")
        self.temperature = weights.kd_temperature
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.image_layers = image_layers
        self.text_layers = text_layers
        if weights.hidden > 0 and (image_layers is None or text_layers is None):
            raise ValueError("hidden-state distillation needs image_layers and text_layers")

    @property
    def needs_teacher(self) -> bool:
        return any(self.weights[k] > 0 for k in ("kd", "embed", "hidden"))

    @property
    def needs_hidden(self) -> bool:
        return self.weights["hidden"] > 0

    def _logits(self, out: CLIPOutputs, gather_with_grad: bool) -> tuple[Tensor, Tensor]:
        image, text = out.image.float(), out.text.float()
        all_image = gather_features(image, self.local_loss, gather_with_grad)
        all_text = gather_features(text, self.local_loss, gather_with_grad)
        return pair_logits(image, text, all_image, all_text, out.logit_scale.float(), self.local_loss)

    def __call__(self, student: CLIPOutputs, teacher: CLIPOutputs | None = None) -> tuple[Tensor, dict]:
        w = self.weights
        if self.needs_teacher and teacher is None:
            raise ValueError("kd/embed/hidden weights > 0 need teacher outputs")
        terms: dict[str, Tensor] = {}
        student_logits = None
        if w["contrastive"] > 0 or w["kd"] > 0:
            student_logits = self._logits(student, self.gather_with_grad)
        if w["contrastive"] > 0:
            terms["contrastive"] = contrastive_loss(*student_logits, self.local_loss)
        if w["kd"] > 0:
            teacher_logits = self._logits(teacher, gather_with_grad=False)
            terms["kd"] = cross_modal_kd(student_logits, teacher_logits, self.temperature)
        if w["embed"] > 0:
            terms["embed"] = embedding_mse(student, teacher)
        if w["hidden"] > 0:
            per_layer = hidden_mse(student.image_hidden, teacher.image_hidden, self.image_layers)
            per_layer += hidden_mse(student.text_hidden, teacher.text_hidden, self.text_layers)
            terms["hidden"] = torch.stack(per_layer).mean()
        total = sum(w[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}


def make_loss(cfg: DistillConfig, student, teacher) -> DistillLoss:
    """The loss cfg describes, for `student` distilled from `teacher` (hidden states map through each
    kept layer's source layer). Without a teacher only the contrastive term is trained."""
    weights = cfg.losses
    if teacher is None:
        weights = dataclasses.replace(weights, kd=0.0, embed=0.0, hidden=0.0)
    layers = {}
    if weights.hidden > 0:
        layers = {
            f"{tower}_layers": layer_map(
                getattr(student.spec, spec).source_layers, getattr(teacher.spec, spec).source_layers
            )
            for tower, spec in (("image", "vision"), ("text", "text"))
        }
    return DistillLoss(weights, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, **layers)


class HiddenRecorder:
    """Collects every block output of both towers during a forward, through forward hooks.

    Hooks (rather than a different forward) keep the DeepSpeed engine wrapping the plain model, so
    ZeRO-3's parameter hooks and the checkpoint's parameter names stay those of the model.
    """

    def __init__(self, model: torch.nn.Module):
        self.hidden: dict[str, list] = {"visual": [], "text": []}
        self.active = False
        self.handles = [
            block.register_forward_hook(functools.partial(self._record, tower))
            for tower in self.hidden
            for block in getattr(model, tower).blocks
        ]

    def close(self) -> None:
        """Remove the hooks and drop the last outputs (graph nodes that would keep the engine alive)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.hidden = [], {"visual": [], "text": []}

    def _record(self, tower, module, args, output):
        if self.active:  # not during gradient-checkpoint recomputation in backward
            self.hidden[tower].append(output)

    def __call__(self, forward, images, texts) -> CLIPOutputs:
        self.hidden, self.active = {"visual": [], "text": []}, True
        try:
            image, text, scale = forward(images, texts)[:3]
        finally:
            self.active = False
        return CLIPOutputs(image, text, scale, self.hidden["visual"], self.hidden["text"])


def clip_outputs(model, recorder: HiddenRecorder | None, images, texts) -> CLIPOutputs:
    """`model(images, texts)` as the losses read it; with block outputs when `recorder` is given."""
    if recorder is not None:
        return recorder(model, images, texts)
    image, text, scale = model(images, texts)[:3]
    return CLIPOutputs(image, text, scale)
