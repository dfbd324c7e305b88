"""Distillation losses vs naive loops and open_clip's ClipLoss, single process and 2-process gloo."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from mope_dist.config import LossWeights
from mope_dist.distill.losses import CLIPOutputs, DistillLoss, layer_map


def loss_of(local_loss=False, gather_with_grad=False, image_layers=None, text_layers=None, **weights):
    """DistillLoss with the terms a test names (the rest off; LossWeights' own defaults turn all on)."""
    w = LossWeights(**{"contrastive": 1.0, "kd": 0.0, "embed": 0.0, "hidden": 0.0, **weights})
    return DistillLoss(
        w,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        image_layers=image_layers,
        text_layers=text_layers,
    )


def _outputs(n=6, d=8, layers=2, tokens=3, width=5, seed=0, scale=10.0) -> CLIPOutputs:
    g = torch.Generator().manual_seed(seed)
    return CLIPOutputs(
        image=F.normalize(torch.randn(n, d, generator=g), dim=-1),
        text=F.normalize(torch.randn(n, d, generator=g), dim=-1),
        logit_scale=torch.tensor(scale),
        image_hidden=[torch.randn(n, tokens, width, generator=g) for _ in range(layers)],
        text_hidden=[torch.randn(n, tokens, width, generator=g) for _ in range(layers)],
    )


def _naive_logits(a, b, scale):
    a, b, scale = a.tolist(), b.tolist(), float(scale)
    return [[scale * sum(x * y for x, y in zip(ra, rb, strict=True)) for rb in b] for ra in a]


def _naive_ce(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return total / len(logits)


def _naive_softmax(row, t):
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    return [x / sum(e) for x in e]


def _naive_kl(student_rows, teacher_rows, t):
    total = 0.0
    for s, q in zip(student_rows, teacher_rows, strict=True):
        ps, pt = _naive_softmax(s, t), _naive_softmax(q, t)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return t * t * total / len(student_rows)


def _naive_mse(a, b):
    a, b = a.flatten().tolist(), b.flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


def _naive_terms(s, t, temperature, image_index, text_index):
    s_i2t, s_t2i = (
        _naive_logits(s.image, s.text, s.logit_scale),
        _naive_logits(s.text, s.image, s.logit_scale),
    )
    t_i2t, t_t2i = (
        _naive_logits(t.image, t.text, t.logit_scale),
        _naive_logits(t.text, t.image, t.logit_scale),
    )
    labels = list(range(s.image.shape[0]))
    hidden = [_naive_mse(s.image_hidden[i], t.image_hidden[j]) for i, j in enumerate(image_index)]
    hidden += [_naive_mse(s.text_hidden[i], t.text_hidden[j]) for i, j in enumerate(text_index)]
    return {
        "contrastive": (_naive_ce(s_i2t, labels) + _naive_ce(s_t2i, labels)) / 2,
        "kd": (_naive_kl(s_i2t, t_i2t, temperature) + _naive_kl(s_t2i, t_t2i, temperature)) / 2,
        "embed": (_naive_mse(s.image, t.image) + _naive_mse(s.text, t.text)) / 2,
        "hidden": sum(hidden) / len(hidden),
    }


def test_terms_match_naive_computation():
    student = _outputs(seed=0, layers=2, scale=8.0)
    teacher = _outputs(seed=1, layers=4, scale=20.0)
    image_index = layer_map([1, 3], [0, 1, 2, 3])
    text_index = layer_map([0, 2], [0, 1, 2, 3])
    weights = {"contrastive": 1.0, "kd": 0.5, "embed": 100.0, "hidden": 2.0}
    loss = loss_of(**weights, kd_temperature=2.0, image_layers=image_index, text_layers=text_index)
    total, terms = loss(student, teacher)
    naive = _naive_terms(student, teacher, 2.0, image_index, text_index)
    for k in naive:
        assert terms[k].item() == pytest.approx(naive[k], rel=1e-5), k
    assert total.item() == pytest.approx(sum(weights[k] * naive[k] for k in naive), rel=1e-5)


def test_contrastive_matches_open_clip_cliploss():
    from open_clip.loss import ClipLoss  # imported here: the spawned workers below need not load open_clip

    s = _outputs(seed=3)
    _, terms = loss_of()(s)
    assert terms["contrastive"].item() == pytest.approx(
        ClipLoss()(s.image, s.text, s.logit_scale).item(), rel=1e-6
    )


def test_teacher_as_student_gives_zero_distillation_terms():
    t = _outputs(seed=4, layers=3)
    loss = DistillLoss(
        LossWeights(contrastive=1.0, kd=1.0, embed=1.0, hidden=1.0, kd_temperature=3.0),
        local_loss=False,
        gather_with_grad=False,
        image_layers=[0, 1, 2],
        text_layers=[0, 1, 2],
    )
    _, terms = loss(t, t)
    for k in ("kd", "embed", "hidden"):
        assert abs(terms[k].item()) < 1e-6, k
    assert terms["contrastive"].item() > 0


def test_zero_weight_skips_term_and_teacher():
    s = _outputs()
    s.image_hidden = s.text_hidden = None
    loss = loss_of(contrastive=1.0)
    assert not loss.needs_teacher and not loss.needs_hidden
    total, terms = loss(s)  # no teacher, no hidden states: nothing else is touched
    assert set(terms) == {"contrastive"} and total.item() == terms["contrastive"].item()
    _, terms = loss_of(contrastive=0.0, embed=1.0)(s, _outputs(seed=9))
    assert set(terms) == {"embed"}
    with pytest.raises(ValueError):
        loss_of(kd=1.0)(s)
    with pytest.raises(ValueError):
        layer_map([0, 5], [0, 1, 2])


KW = dict(
    contrastive=1.0,
    kd=0.7,
    embed=3.0,
    hidden=0.5,
    kd_temperature=2.0,
    image_layers=[0, 1],
    text_layers=[1, 0],
)


def _global_reference(student, teacher, kw):
    """1-process loss and feature gradients over the whole (2N) batch (before any process group)."""
    s = CLIPOutputs(
        student.image.clone().requires_grad_(), student.text.clone().requires_grad_(), student.logit_scale
    )
    s.image_hidden, s.text_hidden = student.image_hidden, student.text_hidden
    total, terms = loss_of(**kw)(s, teacher)
    total.backward()
    return total.detach(), terms, s.image.grad, s.text.grad


def _worker(rank, world, port, queue):
    student, teacher = _outputs(n=8, seed=5), _outputs(n=8, seed=6, scale=15.0)
    ref_total, ref_terms, _, _ = _global_reference(student, teacher, KW)
    cross_modal = {**KW, "embed": 0.0, "hidden": 0.0}  # the gathered terms only
    _, _, ref_gi, ref_gt = _global_reference(student, teacher, cross_modal)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(rank * 4, rank * 4 + 4)

    def local(o, grad=False):
        out = CLIPOutputs(o.image[rows].clone(), o.text[rows].clone(), o.logit_scale)
        out.image_hidden, out.text_hidden = (
            [h[rows] for h in o.image_hidden],
            [h[rows] for h in o.text_hidden],
        )
        out.image.requires_grad_(grad), out.text.requires_grad_(grad)
        return out

    errors = []
    try:
        for local_loss in (False, True):
            for with_grad in (False, True):
                case = f"local_loss={local_loss} with_grad={with_grad}"
                total, terms = loss_of(**KW, local_loss=local_loss, gather_with_grad=with_grad)(
                    local(student), local(teacher)
                )
                mean_total = total.detach().clone()
                torch.distributed.all_reduce(mean_total)
                if abs(mean_total / world - ref_total) > 1e-5:  # local terms are local means
                    errors.append(f"{case}: mean total {mean_total / world} vs {ref_total}")
                if not local_loss:  # every rank computes the global contrastive and kd values
                    errors += [
                        f"{case}: {k}" for k in ("contrastive", "kd") if abs(terms[k] - ref_terms[k]) > 1e-5
                    ]
                    # gradient of the global loss for the local rows; with_grad sums the copies of all ranks
                    s = local(student, grad=True)
                    loss_of(**cross_modal, gather_with_grad=with_grad)(s, local(teacher))[0].backward()
                    factor = world if with_grad else 1
                    if not torch.allclose(s.image.grad, factor * ref_gi[rows], atol=1e-6):
                        errors.append(f"{case}: image grad")
                    if not torch.allclose(s.text.grad, factor * ref_gt[rows], atol=1e-6):
                        errors.append(f"{case}: text grad")
        queue.put((rank, errors))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gathered_losses_match_global():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert results == {0: [], 1: []}
