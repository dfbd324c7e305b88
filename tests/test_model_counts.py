"""Analytic parameter / FLOP counts vs the real modules and torch's FLOP counter."""

import open_clip
import pytest
import torch
from conftest import randomize_, tiny_images, tiny_open_clip, tiny_open_clip_cfg, tiny_texts
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mope_dist.model import (
    KeepSpec,
    TowerKeep,
    count_flops,
    count_params,
    format_counts_table,
    from_open_clip,
    slice_model,
    train_flops_per_sample,
)


def _models():
    base = from_open_clip(tiny_open_clip(layer_scale=True, layers=3, pool="avg"))
    yield "base", base
    yield (
        "pruned",
        slice_model(
            base,
            KeepSpec(
                vision=TowerKeep([0, 2], heads={0: [1], 2: []}, mlp={0: [1, 2, 3]}),
                text=TowerKeep([2], heads={2: [0, 3]}, mlp={2: []}),
            ),
        ),
    )
    cfg = tiny_open_clip_cfg(patch=16, width=96, head_width=32)
    cfg["text_cfg"].update(embed_cls=True, proj_bias=True)
    yield (
        "custom_text",
        from_open_clip(randomize_(open_clip.CustomTextCLIP(**cfg, init_logit_bias=-1.0)).eval()),
    )


MODELS = dict(_models())


@pytest.mark.parametrize("name", list(MODELS))
def test_param_count_matches_modules(name):
    m = MODELS[name]
    counts = count_params(m)
    assert counts["vision"] == sum(p.numel() for p in m.visual.parameters())
    assert counts["text"] == sum(p.numel() for p in m.text.parameters())
    assert counts["total"] == sum(p.numel() for p in m.parameters())


def test_param_count_matches_open_clip():
    oc = tiny_open_clip(layer_scale=True)
    assert count_params(from_open_clip(oc))["total"] == sum(p.numel() for p in oc.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_flops_match_torch_flop_counter(name):
    """Exact: the math SDPA backend decomposes attention into matmuls the counter sees."""
    m = MODELS[name]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as image_counter:
            m.encode_image(tiny_images(1))
        with FlopCounterMode(display=False) as text_counter:
            m.encode_text(tiny_texts(1))
    assert count_flops(m) == {
        "image": image_counter.get_total_flops(),
        "text": text_counter.get_total_flops(),
    }


def test_counts_table():
    table = format_counts_table(MODELS["base"], MODELS["pruned"], names=("teacher", "student"))
    lines = table.splitlines()
    assert "teacher" in lines[0] and "student" in lines[0] and "ratio" in lines[0]
    assert any(line.startswith("GFLOPs / image") for line in lines)
    vision_layers = next(line for line in lines if line.startswith("vision layers")).split()
    assert vision_layers[2:4] == ["3", "2"]
    assert len(format_counts_table(MODELS["base"]).splitlines()) == len(lines)


def test_train_flops_per_sample_against_flop_counter():
    """A measured training step (student forward + backward, teacher forward): the analytic count is an
    upper bound (no input gradient for the first layer) within 10% of the measurement (the losses'
    batch-by-batch logits matmuls are left out)."""
    teacher = MODELS["base"]
    student = slice_model(
        teacher, KeepSpec(vision=TowerKeep([0, 2], heads={}, mlp={}), text=TowerKeep([1], heads={}, mlp={}))
    ).train()
    images, texts = tiny_images(4), tiny_texts(4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            t_image, t_text = teacher.encode_image(images), teacher.encode_text(texts)
        s_image, s_text = student.encode_image(images), student.encode_text(texts)
        ((s_image - t_image).square().mean() + (s_text - t_text).square().mean()).backward()
    analytic = train_flops_per_sample(student, teacher) * len(images)
    measured = counter.get_total_flops()
    assert 0.9 * analytic <= measured <= analytic
    assert train_flops_per_sample(student) < analytic / len(images)  # without the teacher
