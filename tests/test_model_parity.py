"""Import parity: the prunable model must reproduce open_clip's own embeddings (fp32, 1e-5)."""

import json

import open_clip
import pytest
import torch
from conftest import randomize_, tiny_images, tiny_open_clip, tiny_open_clip_cfg, tiny_texts

from mope_dist.model import from_open_clip, load_teacher

TOL = 1e-5


def assert_same_embeddings(oc_model, model, n=3):
    images, texts = tiny_images(n), tiny_texts(n)
    with torch.no_grad():
        ref_i, ref_t = oc_model.encode_image(images), oc_model.encode_text(texts)
        got_i, got_t = model.encode_image(images), model.encode_text(texts)
        ref, got = oc_model(images, texts), model(images, texts)
    assert ref_i.std() > 0.1 and ref_t.std() > 0.1  # a degenerate model would hide mistakes
    torch.testing.assert_close(got_i, ref_i, atol=TOL, rtol=0)
    torch.testing.assert_close(got_t, ref_t, atol=TOL, rtol=0)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(act="quick_gelu"),
        dict(layer_scale=True),
        dict(pool="avg", patch=16),
        dict(width=128, head_width=32, layers=3, patch=16),
        dict(act="quick_gelu", layer_scale=True, pool="avg", text_width=96, text_layers=3),
        dict(no_ln_pre=True),
        dict(final_ln_after_pool=True, pool="avg"),
        dict(final_ln_after_pool=True),
        dict(pos_embed_type="sin_cos_2d"),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
)
def test_parity_clip(kw):
    oc = tiny_open_clip(**kw)
    m = from_open_clip(oc)
    assert_same_embeddings(oc, m)
    assert m.spec.activation == ("quick_gelu" if kw.get("act") == "quick_gelu" else "gelu")
    assert m.spec.vision.layer_scale == kw.get("layer_scale", False)


@pytest.mark.parametrize(
    "text_kw",
    [
        dict(pool_type="argmax"),
        dict(pool_type="last", proj_bias=True),
        dict(pool_type="first", no_causal_mask=True),
        dict(pool_type="eos", eos_id=49407),
        dict(proj_type="none"),
        dict(embed_cls=True),
        dict(embed_cls=True, no_causal_mask=True, proj_bias=True),
        dict(norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"}),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_parity_custom_text(text_kw):
    cfg = tiny_open_clip_cfg()
    cfg["text_cfg"].update(text_kw)
    if text_kw.get("proj_type") == "none":  # no projection: text features have the text width
        cfg["text_cfg"]["width"] = cfg["embed_dim"]
        cfg["text_cfg"]["heads"] = cfg["embed_dim"] // 16
    for key in ("norm_kwargs", "act_kwargs"):
        if key in text_kw:
            cfg["vision_cfg"][key] = text_kw[key]
    torch.manual_seed(0)
    oc = randomize_(open_clip.CustomTextCLIP(**cfg)).eval()
    assert_same_embeddings(oc, from_open_clip(oc))


def test_parity_logit_bias_and_clamp():
    cfg = tiny_open_clip_cfg()
    oc = randomize_(open_clip.CLIP(**cfg, init_logit_bias=-3.0)).eval()
    m = from_open_clip(oc)
    assert_same_embeddings(oc, m)  # 4-tuple with the bias, like open_clip
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
        _, _, scale, _ = m(tiny_images(1), tiny_texts(1))
    assert scale.item() == pytest.approx(100.0, rel=1e-6)


def test_non_square_image():
    oc = tiny_open_clip(image_size=(32, 48), patch=(8, 16))
    m = from_open_clip(oc)
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(images), oc.encode_image(images), atol=TOL, rtol=0)


def test_hidden_states_match_open_clip_intermediates():
    oc = tiny_open_clip(layers=3)
    m = from_open_clip(oc)
    images, texts = tiny_images(2), tiny_texts(2)
    with torch.no_grad():
        ref = oc.forward_intermediates(images, texts, image_output_fmt="NLC", image_output_extra_tokens=True)
        feats, hidden = m.encode_image(images, return_hidden=True)
        _, text_hidden = m.encode_text(texts, return_hidden=True)
    assert len(hidden) == 3 and len(text_hidden) == 3
    for h, prefix, tokens in zip(
        hidden, ref["image_intermediates_prefix"], ref["image_intermediates"], strict=True
    ):
        torch.testing.assert_close(h, torch.cat([prefix, tokens], 1), atol=TOL, rtol=0)
    for h, r in zip(text_hidden, ref["text_intermediates"], strict=True):
        torch.testing.assert_close(h, r, atol=TOL, rtol=0)
    torch.testing.assert_close(feats, m.encode_image(images), atol=0, rtol=0)


@pytest.mark.parametrize(
    "cfg_change, message",
    [
        (lambda c: c["vision_cfg"].update(layers=(1, 1, 1, 1), width=32), "ModifiedResNet"),
        (lambda c: c["vision_cfg"].update(attentional_pool=True), "attentional pooler"),
        (lambda c: c["vision_cfg"].update(qk_norm=True), "CustomResidualAttentionBlock"),
    ],
)
def test_unsupported_raise_clear_errors(cfg_change, message):
    cfg = tiny_open_clip_cfg()
    cfg_change(cfg)
    with pytest.raises(ValueError, match=message) as e:
        from_open_clip(open_clip.CLIP(**cfg))
    assert "supported:" in str(e.value)


def _write_tiny_config(tmp_path, name, cfg):
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir)


def test_import_by_name_and_local_weights(tmp_path):
    cfg = tiny_open_clip_cfg(act="quick_gelu", layer_scale=True)
    _write_tiny_config(tmp_path, "mope-tiny-test", cfg)
    oc = randomize_(open_clip.create_model("mope-tiny-test")).eval()
    torch.save(oc.state_dict(), tmp_path / "weights.pt")
    m = from_open_clip("mope-tiny-test", pretrained=str(tmp_path / "weights.pt"))
    assert_same_embeddings(oc, m)
    assert m.spec.activation == "quick_gelu"


def test_import_local_dir_and_load_teacher(tmp_path):
    cfg = tiny_open_clip_cfg(pool="avg")
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg})
    )
    oc = randomize_(open_clip.CLIP(**cfg)).eval()
    torch.save(oc.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    m, pre_train, pre_val, tok = load_teacher(f"local-dir:{tmp_path}")
    assert_same_embeddings(oc, m)
    assert m.spec.preprocess["mean"] == [0.5, 0.5, 0.5]
    normalize = pre_val.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.25, 0.25, 0.25]
    assert tok(["a photo of a cat"]).shape == (1, 16)
    ref_tok = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    assert torch.equal(tok(["a photo of a cat"]), ref_tok(["a photo of a cat"]))
