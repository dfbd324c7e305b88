"""Masks vs physical slicing: removing a unit by mask must equal slicing it away (within 1e-5)."""

import pytest
import torch
from conftest import tiny_images, tiny_open_clip, tiny_texts

from mope_dist.model import KeepSpec, TowerKeep, TowerMasks, from_open_clip, slice_model

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return from_open_clip(tiny_open_clip(layer_scale=True, layers=3, seed=1))


@pytest.fixture(scope="module")
def inputs():
    return {"vision": tiny_images(3), "text": tiny_texts(3)}


def masks_for(keep: TowerKeep, tower) -> TowerMasks:
    """The single-candidate TowerMasks that removes what `keep` drops."""
    L = len(tower.blocks)
    head = [torch.zeros(1, b.num_heads) for b in tower.blocks]
    mlp = [torch.zeros(1, b.mlp_dim) for b in tower.blocks]
    layer = torch.zeros(1, L)
    for i in keep.layers:
        layer[0, i] = 1
        head[i][0, keep.heads.get(i, list(range(tower.blocks[i].num_heads)))] = 1
        mlp[i][0, keep.mlp.get(i, list(range(tower.blocks[i].mlp_dim)))] = 1
    return TowerMasks(head=head, mlp=mlp, layer=layer)


def stack(masks: list[TowerMasks]) -> TowerMasks:
    """Candidates side by side: candidate c = masks[c]."""
    L = len(masks[0].head)
    return TowerMasks(
        head=[torch.cat([m.head[i] for m in masks]) for i in range(L)],
        mlp=[torch.cat([m.mlp[i] for m in masks]) for i in range(L)],
        layer=torch.cat([m.layer for m in masks]),
    )


CASES = {
    "one_head": TowerKeep([0, 1, 2], heads={1: [0, 2, 3]}),
    "heads_everywhere": TowerKeep([0, 1, 2], heads={0: [1], 1: [0, 3], 2: [2, 1]}),
    "neurons": TowerKeep([0, 1, 2], mlp={0: list(range(0, 256, 3)), 2: [5, 7, 200]}),
    "layer": TowerKeep([0, 2]),
    "all_heads_of_a_layer": TowerKeep([0, 1, 2], heads={1: []}),
    "all_neurons_of_a_layer": TowerKeep([0, 1, 2], mlp={0: []}),
    "mixed": TowerKeep([1, 2], heads={1: [], 2: [3]}, mlp={1: [1, 2, 3], 2: []}),
}


@pytest.mark.parametrize("tower_name", ["vision", "text"])
@pytest.mark.parametrize("case", list(CASES))
def test_mask_equals_slice(model, inputs, tower_name, case):
    keep = CASES[case]
    sliced = slice_model(model, KeepSpec(**{tower_name: keep}))
    attr = "visual" if tower_name == "vision" else "text"
    tower, x = getattr(model, attr), inputs[tower_name]
    with torch.no_grad():
        ref = getattr(sliced, attr)(x)
        full = tower(x)
        got = tower(x, masks=masks_for(keep, tower))
    assert (ref - full).abs().max() > 1e-3  # the removal does change the output
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


def test_batched_candidates_are_candidate_major(model, inputs):
    """C candidates in one batch give, row block by row block, each candidate's own output."""
    tower, x = model.visual, inputs["vision"]
    keeps = [CASES["one_head"], TowerKeep([0, 1, 2]), CASES["mixed"], CASES["layer"]]
    with torch.no_grad():
        got = tower(x, masks=stack([masks_for(k, tower) for k in keeps]))
        assert got.shape[0] == len(keeps) * x.shape[0]
        for c, k in enumerate(keeps):
            ref = slice_model(model, KeepSpec(vision=k)).visual(x)
            torch.testing.assert_close(got[c * 3 : (c + 1) * 3], ref, atol=TOL, rtol=0)


def test_staged_run_blocks_with_partial_masks(model, inputs):
    """embed -> run_blocks(0, l) -> run_blocks(l, masks with None entries) -> head, as scoring runs it."""
    tower, x = model.text, inputs["text"]
    masks = TowerMasks(head=[None, None, torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1]])], mlp=None, layer=None)
    with torch.no_grad():
        h = tower.run_blocks(tower.embed(x), 0, 2, inputs=x)
        y = tower.run_blocks(h.repeat(2, 1, 1), 2, masks=masks, inputs=x)
        got = tower.head(y, x)
        ref = slice_model(model, KeepSpec(text=TowerKeep([0, 1, 2], heads={2: [0, 2, 3]}))).text(x)
    torch.testing.assert_close(got[:3], ref, atol=TOL, rtol=0)
    torch.testing.assert_close(got[3:], tower(x), atol=TOL, rtol=0)


def test_layer_mask_is_identity_and_hiddens(model, inputs):
    tower, x = model.visual, inputs["vision"]
    masks = TowerMasks(layer=torch.tensor([[1.0, 0.0, 1.0]]))
    with torch.no_grad():
        e = tower.embed(x)
        out, hidden = tower.run_blocks(e, masks=masks, return_hidden=True)
        h0 = tower.run_blocks(e, 0, 1)
    assert len(hidden) == 3
    torch.testing.assert_close(hidden[1], hidden[0], atol=0, rtol=0)  # layer 1 removed: exactly identity
    torch.testing.assert_close(hidden[0], h0, atol=0, rtol=0)
    torch.testing.assert_close(out, hidden[2], atol=0, rtol=0)


def test_all_heads_removed_leaves_scaled_out_proj_bias(model, inputs):
    """The attention branch of a headless layer is ls_1 * out_proj.bias (not zero)."""
    sliced = slice_model(model, KeepSpec(vision=TowerKeep([0, 1, 2], heads={0: []})))
    block = sliced.visual.blocks[0]
    assert block.num_heads == 0 and block.attn.qkv.weight.shape == (0, 64)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = block(x)
        h = x + block.ls_1.gamma * block.attn.out_proj.bias
        ref = h + block.ls_2(block.mlp(block.ln_2(h)))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_mask_gradients_flow(model, inputs):
    head = torch.ones(1, 4, requires_grad=True)
    out = model.visual(inputs["vision"], masks=TowerMasks(head=[None, head, None]))
    out.sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_slicing_a_sliced_model_composes(model, inputs):
    first = slice_model(
        model, KeepSpec(vision=TowerKeep([0, 2], heads={2: [1, 2, 3]}), text=TowerKeep([1, 2]))
    )
    assert first.spec.vision.source_layers == [0, 2] and first.spec.text.source_layers == [1, 2]
    second = slice_model(first, KeepSpec(vision=TowerKeep([1], heads={1: [0, 2]})))
    assert second.spec.vision.source_layers == [2]
    assert second.spec.vision.heads == [2] and second.spec.text.source_layers == [1, 2]
    direct = slice_model(model, KeepSpec(vision=TowerKeep([2], heads={2: [1, 3]}), text=TowerKeep([1, 2])))
    with torch.no_grad():
        torch.testing.assert_close(
            second.encode_image(inputs["vision"]), direct.encode_image(inputs["vision"])
        )
    for (n1, p1), (n2, p2) in zip(second.state_dict().items(), direct.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_sliced_model_is_independent_and_dense(model):
    sliced = slice_model(model, KeepSpec(vision=TowerKeep([0, 1], heads={0: [0]}, mlp={1: [3, 4]})))
    assert sliced.visual.blocks[0].attn.qkv.weight.shape == (3 * 16, 64)
    assert sliced.visual.blocks[0].attn.out_proj.weight.shape == (64, 16)
    assert sliced.visual.blocks[1].mlp.c_fc.weight.shape == (2, 64)
    with torch.no_grad():
        sliced.text.token_embedding.weight.zero_()
    assert model.text.token_embedding.weight.abs().sum() > 0  # copies, not views


def test_keepspec_roundtrip_and_validation(model):
    keep = KeepSpec(vision=TowerKeep([0, 2], heads={0: [1, 3]}, mlp={2: [0, 5]}))
    assert KeepSpec.from_dict(keep.to_dict()) == keep
    import json

    assert KeepSpec.from_dict(json.loads(json.dumps(keep.to_dict()))) == keep
    for bad in (
        TowerKeep([2, 0]),
        TowerKeep([0, 3]),
        TowerKeep([0, 1], heads={0: [4]}),
        TowerKeep([0, 1], heads={0: [1, 1]}),
        TowerKeep([0, 1], mlp={5: [0]}),
    ):
        with pytest.raises(ValueError):
            slice_model(model, KeepSpec(vision=bad))


def test_grad_checkpointing_gives_same_gradients(model, inputs):
    def grads(enable):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        img, txt, scale = model(inputs["vision"], inputs["text"])
        (img @ txt.T * scale).logsumexp(0).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        ref, got = grads(False), grads(True)
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad()
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4)


def test_masked_padding_text_tower_under_bf16_autocast():
    """Scoring runs masked candidates under autocast: the padding mask must not clash with bf16 q/k/v."""
    import open_clip
    from conftest import randomize_, tiny_open_clip_cfg

    cfg = tiny_open_clip_cfg()
    cfg["text_cfg"]["embed_cls"] = True
    m = from_open_clip(randomize_(open_clip.CustomTextCLIP(**cfg)).eval())
    texts = tiny_texts(2)
    masks = TowerMasks(head=[torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1]]), None])
    with torch.no_grad():
        ref = m.text(texts, masks=masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.text(texts, masks=masks)
    assert got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref, atol=0.1 * ref.abs().max().item(), rtol=0)
