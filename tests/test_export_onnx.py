"""ONNX export of each tower: onnxruntime against the PyTorch model for pruned tiny models (uneven
per-layer widths, dropped layers, both vision poolings, argmax and last text pooling), export.json read
the way a client without PyTorch would read it, fp16, --image-size, and the tool's refusals."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_, tiny_images, tiny_open_clip, tiny_texts
from PIL import Image, ImageDraw

from mope_dist.errors import JobError
from mope_dist.model import (
    CLIPSpec,
    KeepSpec,
    PrunableCLIP,
    TextSpec,
    TowerKeep,
    VisionSpec,
    create_model_and_transforms,
    from_open_clip,
    get_tokenizer,
    save_pretrained,
    slice_model,
)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx's exporter needs it

from mope_dist.model import onnx_export  # noqa: E402  (needs the export extra)

_spec = importlib.util.spec_from_file_location("export_onnx", REPO / "tools" / "export_onnx.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.fixture(scope="module")
def avg_argmax():
    """Vision: avg pooling, a layer without heads, MLP widths 256 and 3, layer 1 of 3 dropped; text:
    argmax pooling, one head, a layer without MLP, layer 0 dropped; quick_gelu, layer scale."""
    teacher = from_open_clip(tiny_open_clip(act="quick_gelu", layer_scale=True, pool="avg", layers=3))
    keep = KeepSpec(
        vision=TowerKeep([0, 2], heads={0: [1, 2], 2: []}, mlp={2: [4, 9, 77]}),
        text=TowerKeep([1, 2], heads={1: [3]}, mlp={1: []}),
    )
    return slice_model(teacher, keep)


@pytest.fixture(scope="module")
def tok_last():
    """Vision: class-token pooling; text: last-token pooling with a padding mask and a linear projection;
    per-layer heads and MLP widths all different (one layer without heads, one without MLP), teacher
    layers 1, 3, 4 of the vision tower and 0, 2 of the text tower dropped; gelu_tanh."""
    spec = CLIPSpec(
        embed_dim=24,
        vision=VisionSpec(
            width=64,
            head_dim=16,
            heads=[4] * 6,
            mlp_dims=[256] * 6,
            image_size=[32, 32],
            patch_size=[8, 8],
            pool_type="tok",
        ),
        text=TextSpec(
            width=48,
            head_dim=16,
            heads=[3] * 4,
            mlp_dims=[192] * 4,
            context_length=16,
            pool_type="last",
            pad_mask=True,
            proj_type="linear",
        ),
        activation="gelu_tanh",
    )
    torch.manual_seed(0)
    full = randomize_(PrunableCLIP(spec), seed=3).eval()
    keep = KeepSpec(
        vision=TowerKeep(
            [0, 2, 5], heads={2: [1], 5: [0, 2, 3]}, mlp={2: [3, 50, 99, 100, 101, 200, 255], 5: []}
        ),
        text=TowerKeep([1, 3], heads={1: [0, 2], 3: []}, mlp={1: list(range(0, 186, 6))}),
    )
    return slice_model(full, keep)


@pytest.fixture(scope="module")
def tok_last_export(tok_last, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_last") / "onnx"
    meta = onnx_export.export_onnx(tok_last, out, provenance={"test": "tok_last"})
    return out, meta


def _run(session, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_library_export_matches_pytorch(tok_last, tok_last_export):
    out, meta = tok_last_export
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "image_encoder.onnx", "text_encoder.onnx"]
    assert json.loads((out / "export.json").read_text()) == meta
    image, text = (ort.InferenceSession(str(out / f)) for f in ("image_encoder.onnx", "text_encoder.onnx"))
    for n in (1, 5):  # the graphs were traced at batch 2: the batch axis is dynamic
        with torch.no_grad():
            want_image = tok_last.encode_image(tiny_images(n, seed=n)).numpy()
            want_text = tok_last.encode_text(tiny_texts(n, seed=n)).numpy()
        np.testing.assert_allclose(_run(image, tiny_images(n, seed=n)), want_image, rtol=0, atol=1e-4)
        np.testing.assert_allclose(_run(text, tiny_texts(n, seed=n)), want_text, rtol=0, atol=1e-4)
        assert want_image.shape == (n, 24) and want_text.shape == (n, 24)

    for session, key in ((image, "image_encoder"), (text, "text_encoder")):
        (inp,), (outp,) = session.get_inputs(), session.get_outputs()
        assert [inp.name, inp.shape] == [meta[key]["input"]["name"], meta[key]["input"]["shape"]]
        assert [outp.name, outp.shape] == [meta[key]["output"]["name"], ["batch", 24]]
        graph = onnx.load(str(out / meta[key]["file"]))
        assert {o.version for o in graph.opset_import if o.domain == ""} == {meta["opset"]}
    assert meta["image_encoder"]["input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["text_encoder"]["input"] == {"name": "input_ids", "shape": ["batch", 16], "dtype": "int64"}
    assert (
        meta["normalized"] is False and meta["dtype"] == "fp32" and meta["provenance"] == {"test": "tok_last"}
    )
    assert all(r["max_abs_diff"] <= 1e-4 for t in ("image", "text") for r in meta["parity"][t])


def test_parity_check_catches_a_different_model(tok_last, tok_last_export):
    out, _ = tok_last_export
    cases = onnx_export.random_cases(tok_last, seed=5)
    report = onnx_export.check_parity(tok_last, out, "fp32", cases)
    assert len(report["image"]) == len(report["text"]) == 2
    changed = copy.deepcopy(tok_last)
    with torch.no_grad():
        changed.text.blocks[1].mlp.c_fc.bias[0] += 0.05
    with pytest.raises(JobError, match="text encoder .fp32. disagrees"):
        onnx_export.check_parity(changed, out, "fp32", cases)


def scene(path, size=(75, 50)):
    """A small non-square picture, so the client's resize and centre crop matter."""
    img = Image.new("RGB", size, (200, 200, 230))
    draw = ImageDraw.Draw(img)
    draw.ellipse([10, 8, 40, 38], fill=(220, 30, 30))
    draw.rectangle([45, 20, 70, 45], fill=(30, 60, 220))
    img.save(path)
    return path


def client_pixels(path, meta) -> np.ndarray:
    """export.json's preprocess with PIL and numpy only (the README's client)."""
    pre = meta["preprocess"]
    s = pre["image_size"][0]
    assert (
        pre["image_size"] == [s, s] and pre["resize_mode"] == "shortest" and pre["interpolation"] == "bicubic"
    )
    img = Image.open(path).convert(pre["mode"])
    w, h = img.size
    img = img.resize((s, s * h // w) if w <= h else (s * w // h, s), Image.Resampling.BICUBIC)
    left, top = round((img.width - s) / 2), round((img.height - s) / 2)
    x = np.asarray(img.crop((left, top, left + s, top + s)), np.float32) / 255
    x = (x - np.float32(pre["mean"])) / np.float32(pre["std"])
    return x.transpose(2, 0, 1)[None]


def test_tool_export_as_a_client_uses_it(avg_argmax, tmp_path):
    save_pretrained(avg_argmax, tmp_path / "model", provenance={"teacher": "tiny"})
    picture = scene(tmp_path / "scene.png")
    captions = ["a red circle and a blue square", "a photo of a dog on the grass"]
    argv = [str(tmp_path / "model"), str(tmp_path / "onnx"), "--image", str(picture)]
    summary = tool.main(argv + [a for c in captions for a in ("--caption", c)])
    assert summary["parity"]["image"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx", "scene.png"]  # no temp dir left

    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["provenance"] == {
        "model_dir": str((tmp_path / "model").resolve()),
        "model": {"teacher": "tiny"},
    }
    assert [r["inputs"] for r in meta["parity"]["text"]][-1] == "2 captions via the tokenizer"
    from open_clip.tokenizer import SimpleTokenizer

    image = ort.InferenceSession(str(tmp_path / "onnx" / meta["image_encoder"]["file"]))
    text = ort.InferenceSession(str(tmp_path / "onnx" / meta["text_encoder"]["file"]))
    pixels = client_pixels(picture, meta)
    ids = SimpleTokenizer(context_length=meta["tokenizer"]["context_length"])(captions).numpy()
    image_emb = image.run(None, {meta["image_encoder"]["input"]["name"]: pixels})[0]
    text_emb = text.run(None, {meta["text_encoder"]["input"]["name"]: ids})[0]

    model, _, preprocess = create_model_and_transforms(tmp_path / "model")
    with Image.open(picture) as img:
        want_pixels = preprocess(img)[None]
    want_ids = get_tokenizer(model)(captions)
    np.testing.assert_allclose(pixels, want_pixels.numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(ids, want_ids.numpy())
    with torch.no_grad():
        want_image, want_text, want_scale = model(want_pixels, want_ids)
        raw_image = model.encode_image(want_pixels).numpy()
    np.testing.assert_allclose(image_emb, raw_image, rtol=0, atol=1e-4)  # raw: "normalized": false
    norm = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)  # noqa: E731
    logits = meta["logit_scale"] * norm(image_emb) @ norm(text_emb).T
    np.testing.assert_allclose(logits, (want_scale * want_image @ want_text.T).numpy(), rtol=0, atol=1e-3)


def test_tool_fp16_at_another_image_size_and_opset(avg_argmax, tmp_path):
    save_pretrained(avg_argmax, tmp_path / "model")
    options = ["--dtype", "fp16", "--image-size", "48", "--opset", "20"]
    summary = tool.main([str(tmp_path / "model"), str(tmp_path / "onnx"), *options])
    assert summary["image_input"] == {
        "name": "pixel_values",
        "shape": ["batch", 3, 48, 48],
        "dtype": "float32",
    }
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["dtype"] == "fp16" and meta["preprocess"]["image_size"] == [48, 48]
    assert meta["parity"]["criterion"] == "max_rel_diff <= 0.01"
    assert meta["provenance"]["image_size_changed_from"] == [32, 32]
    for key in ("image_encoder", "text_encoder"):
        graph = onnx.load(str(tmp_path / "onnx" / meta[key]["file"]))
        kinds = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in graph.graph.initializer}
        assert "float16" in kinds and meta[key]["output"]["dtype"] == "float32"
        assert {o.version for o in graph.opset_import if o.domain == ""} == {20} == {meta["opset"]}

    resized = onnx_export.with_image_size(avg_argmax, [48, 48])
    g = torch.Generator().manual_seed(7)
    images, texts = torch.randn(4, 3, 48, 48, generator=g), tiny_texts(4, seed=7)
    with torch.no_grad():
        want = {"image": resized.encode_image(images).numpy(), "text": avg_argmax.encode_text(texts).numpy()}
    for key, x in (("image", images), ("text", texts)):
        got = _run(ort.InferenceSession(str(tmp_path / "onnx" / meta[f"{key}_encoder"]["file"])), x)
        rel = np.linalg.norm(got - want[key], axis=1) / np.linalg.norm(want[key], axis=1)
        assert rel.max() <= 1e-2 and np.abs(got - want[key]).max() > 1e-6  # close, but computed in fp16


def test_with_image_size_matches_open_clip():
    """open_clip's own model built for 48 px, loaded through its resize_pos_embed, is the reference."""
    import open_clip
    from conftest import tiny_open_clip_cfg
    from open_clip.model import resize_pos_embed

    small = tiny_open_clip(pool="avg")
    ours = from_open_clip(small)
    before = ours.visual.positional_embedding.clone()
    resized = onnx_export.with_image_size(ours, [48, 48])
    cfg = tiny_open_clip_cfg(pool="avg")
    cfg["vision_cfg"]["image_size"] = 48
    big = open_clip.CLIP(**cfg).eval()
    state = small.state_dict()
    resize_pos_embed(state, big)
    big.load_state_dict(state)
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(resized.encode_image(images), big.encode_image(images), rtol=0, atol=1e-5)
    assert resized.spec.vision.image_size == [48, 48] and torch.equal(
        ours.visual.positional_embedding, before
    )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        onnx_export.with_image_size(ours, [30, 30])


@pytest.fixture
def saved(avg_argmax, tmp_path, monkeypatch):
    save_pretrained(avg_argmax, tmp_path / "model")

    def never(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(tool, "load_model", never)
    return tmp_path / "model"


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty dir", "is not a mope-dist model directory"),
        ("foreign config", "is not a mope-dist model directory"),
        ("missing dir", "not found"),
        ("existing output", "already exists (pass --overwrite"),
        ("bad image size", "--image-size 30: image size [30, 30] is not a positive multiple"),
        ("bad image", "cannot be read as an image"),
        ("bad opset", "--opset 99: onnx"),
    ],
)
def test_tool_refuses_bad_input_with_one_line(case, message, saved, tmp_path, capsys):
    model, out, extra = saved, tmp_path / "out", []
    if case == "empty dir":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "foreign config":
        model = tmp_path / "bert"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (model / "model.safetensors").write_bytes(b"")
    elif case == "missing dir":
        model = tmp_path / "nowhere"
    elif case == "existing output":
        out.mkdir()
    elif case == "bad image size":
        extra = ["--image-size", "30"]
    elif case == "bad opset":
        extra = ["--opset", "99"]
    else:
        (tmp_path / "notes.jpg").write_text("not a picture")
        extra = ["--image", str(tmp_path / "notes.jpg")]
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(model), str(out), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export_onnx: error: ") and message in err[0]
    assert out.exists() == (case == "existing output")


def test_tool_as_a_script_refuses_a_non_model_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_onnx.py"), str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"export_onnx: error: {tmp_path} is not a mope-dist model directory (config.json + model.safetensors)"
    ]
    assert not (tmp_path / "out").exists()


def test_failed_comparison_writes_nothing(tmp_path, monkeypatch, capsys):
    save_pretrained(from_open_clip(tiny_open_clip(layers=1)), tmp_path / "model")
    monkeypatch.setitem(onnx_export.PARITY, "fp32", ("max_abs_diff", -1.0))  # no export can pass this
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path / "model"), str(tmp_path / "onnx")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image encoder (fp32) disagrees with PyTorch on random x1" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
