"""Standalone format: save/load round trip, open_clip-style loaders, zero-shot helpers on the result."""

import json

import open_clip
import pytest
import torch
from conftest import tiny_images, tiny_open_clip, tiny_texts

import mope_dist
from mope_dist.model import (
    KeepSpec,
    TowerKeep,
    count_params,
    create_model_and_transforms,
    from_open_clip,
    get_tokenizer,
    load_model,
    save_pretrained,
    slice_model,
)


@pytest.fixture(scope="module")
def pruned():
    teacher = from_open_clip(tiny_open_clip(act="quick_gelu", layer_scale=True, pool="avg", layers=3))
    keep = KeepSpec(
        vision=TowerKeep([0, 2], heads={0: [1, 2], 2: []}, mlp={2: [4, 9, 77]}),
        text=TowerKeep([1, 2], heads={1: [3]}, mlp={1: []}),
    )
    return slice_model(teacher, keep)


def test_round_trip_exact(pruned, tmp_path):
    out = tmp_path / "student"
    save_pretrained(pruned, out, provenance={"teacher": "tiny", "plan": {"note": "test"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # nothing temporary left behind
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(out)
    assert loaded.spec == pruned.spec
    ref_sd, got_sd = pruned.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    images, texts = tiny_images(), tiny_texts()
    with torch.no_grad():
        for a, b in zip(pruned(images, texts), loaded(images, texts), strict=True):
            assert torch.equal(a, b)

    config = json.loads((out / "config.json").read_text())
    assert config["provenance"] == {"teacher": "tiny", "plan": {"note": "test"}}
    assert config["counts"]["params"] == count_params(pruned)
    vision = config["spec"]["vision"]
    assert vision["heads"] == [2, 0] and vision["mlp_dims"] == [256, 3] and vision["source_layers"] == [0, 2]
    assert config["spec"]["activation"] == "quick_gelu" and vision["pool_type"] == "avg"
    assert config["spec"]["text"]["context_length"] == 16 and vision["image_size"] == [32, 32]


def test_no_pickle_in_weights(pruned, tmp_path):
    save_pretrained(pruned, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").read_bytes().startswith(b"PK")  # not a torch zip


def test_overwrite_flag(pruned, tmp_path):
    save_pretrained(pruned, tmp_path / "m")
    save_pretrained(pruned, tmp_path / "m")  # default overwrites
    with pytest.raises(FileExistsError):
        save_pretrained(pruned, tmp_path / "m", overwrite=False)


def test_loaders_and_zero_shot_classifier(pruned, tmp_path):
    save_pretrained(pruned, tmp_path / "m")
    model, pre_train, pre_val = mope_dist.create_model_and_transforms(str(tmp_path / "m"))
    assert mope_dist.load_model is load_model and mope_dist.get_tokenizer is get_tokenizer
    assert create_model_and_transforms is mope_dist.create_model_and_transforms
    from PIL import Image

    img = Image.new("RGB", (50, 40), color=(120, 30, 200))
    assert pre_val(img).shape == (3, 32, 32) and pre_train(img).shape == (3, 32, 32)

    tok = mope_dist.get_tokenizer(str(tmp_path / "m"))
    assert tok(["a photo of a dog"]).shape == (1, 16)
    assert torch.equal(tok(["a dog"]), open_clip.tokenize(["a dog"], context_length=16))
    assert get_tokenizer(model).context_length == 16

    classifier = open_clip.build_zero_shot_classifier(
        model,
        tokenizer=tok,
        classnames=["cat", "dog", "car"],
        templates=["a photo of a {}.", "a {}."],
        device="cpu",
    )
    assert classifier.shape == (pruned.spec.embed_dim, 3)
    with torch.no_grad():
        logits = model.encode_image(pre_val(img)[None], normalize=True) @ classifier
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_load_rejects_foreign_dirs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a mope-dist"):
        load_model(tmp_path)


def test_load_teacher_accepts_a_model_dir(pruned, tmp_path):
    """A pruned student can be the next stage's teacher."""
    from mope_dist.model import load_teacher

    save_pretrained(pruned, tmp_path / "m")
    model, _, pre_val, tok = load_teacher(str(tmp_path / "m"))
    assert model.spec == pruned.spec and tok.context_length == 16 and callable(pre_val)
