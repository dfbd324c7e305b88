"""Zero-shot and retrieval evaluation against open_clip's own classifier and naive loops, 1 and 2 ranks.

Run as a script (under torchrun) this file is also the 2-process worker.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file, save_file

from mope_dist.eval import build_classifier, evaluate_retrieval, evaluate_zeroshot

CLASSNAMES = ["cat", "dog", "car", "tree", "boat", "house", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]
N_IMAGES = 25  # not divisible by 2 (the world size of the distributed test): 13 + 12 images, 4 + 3 batches
CTX = 16


def tiny_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": CTX, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    )
    return model.eval()


tokenizer = functools.partial(open_clip.tokenize, context_length=CTX)


def make_data(model):
    """Random images; half the labels set to the model's own prediction so top-1 is far from chance."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(N_IMAGES, 3, 32, 32, generator=g)
    labels = torch.randint(len(CLASSNAMES), (N_IMAGES,), generator=g)
    with torch.no_grad():
        clf = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
        pred = (model.encode_image(images, normalize=True) @ clf).argmax(1)
    labels[::2] = pred[::2]
    captions = [f"{t.format(c)} number {i}" for i, c in enumerate(CLASSNAMES * 4) for t in TEMPLATES][:50]
    text_to_image = torch.arange(len(captions)) % (N_IMAGES - 1)  # the last image has no caption
    return images, labels, tokenizer(captions), text_to_image


def rank_part(images, labels, rank, world, batch_size=4):
    """Disjoint strided part per rank, like the labelled loader: the union is every sample once."""
    idx = torch.arange(rank, N_IMAGES, world)
    return [
        (images[idx[i : i + batch_size]], labels[idx[i : i + batch_size]])
        for i in range(0, len(idx), batch_size)
    ]


def reference_zeroshot(model, images, labels):
    with torch.no_grad():
        clf = open_clip.build_zero_shot_classifier(
            model, tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=None
        )
        top1 = top5 = 0
        for img, lab in zip(images, labels, strict=True):
            logits = model.encode_image(img[None], normalize=True)[0] @ clf
            order = logits.argsort(descending=True).tolist()
            top1 += order[0] == lab.item()
            top5 += lab.item() in order[:5]
    return {"top1": top1 / len(labels), "top5": top5 / len(labels), "n": len(labels)}


def reference_retrieval(model, images, texts, text_to_image):
    """Naive per-query ranking with one forward per item."""
    with torch.no_grad():
        img = torch.cat([model.encode_image(x[None], normalize=True) for x in images])
        txt = torch.cat([model.encode_text(t[None], normalize=True) for t in texts])
    sim = img @ txt.T
    out = {}
    for k in (1, 5, 10):
        queries = [i for i in range(len(images)) if (text_to_image == i).any()]
        i2t = [any(text_to_image[j] == i for j in sim[i].argsort(descending=True)[:k]) for i in queries]
        t2i = [text_to_image[j] in sim[:, j].argsort(descending=True)[:k] for j in range(len(texts))]
        out[f"i2t_R@{k}"] = sum(map(bool, i2t)) / len(queries)
        out[f"t2i_R@{k}"] = sum(map(bool, t2i)) / len(texts)
    return out


def run_eval(model, rank, world):
    images, labels, texts, text_to_image = make_data(model)
    clf = build_classifier(model, CLASSNAMES, TEMPLATES, tokenizer, "cpu")
    zs = evaluate_zeroshot(model, rank_part(images, labels, rank, world), clf, "cpu", progress=False)
    ret = evaluate_retrieval(model, images, texts, text_to_image, "cpu", batch_size=8, chunk=7)
    # One image: under 2 ranks one of them has an empty slice and must still join the all-reduce.
    one = evaluate_retrieval(model, images[:1], texts[:3], torch.zeros(3, dtype=torch.long), "cpu")
    assert one["i2t_R@1"] == one["t2i_R@1"] == 1.0
    return zs, ret


def test_classifier_equals_open_clip():
    model = tiny_clip()
    ours = build_classifier(model, CLASSNAMES, TEMPLATES, tokenizer, "cpu")
    with torch.no_grad():
        ref = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
    assert ours.shape == (32, len(CLASSNAMES)) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)


def test_zeroshot_and_retrieval_match_naive():
    model = tiny_clip().train()
    zs, ret = run_eval(model, 0, 1)
    assert model.training, "evaluation must restore train mode"
    images, labels, texts, text_to_image = make_data(model.eval())
    ref = reference_zeroshot(model, images, labels)
    assert zs["n"] == ref["n"] == N_IMAGES
    assert zs["top1"] == pytest.approx(ref["top1"]) and zs["top5"] == pytest.approx(ref["top5"])
    assert 0.4 < zs["top1"] < 1.0 and zs["images_per_s"] > 0
    ref = reference_retrieval(model, images, texts, text_to_image)
    for key, value in ref.items():
        assert ret[key] == pytest.approx(value), key
    assert ret["mean_recall"] == pytest.approx(sum(ref.values()) / 6)
    assert (
        ret["n_images"] == N_IMAGES and ret["n_texts"] == len(texts) and ret["n_i2t_queries"] == N_IMAGES - 1
    )


def test_small_class_count_and_bad_inputs():
    model = tiny_clip()
    clf = build_classifier(model, CLASSNAMES[:3], TEMPLATES, tokenizer, "cpu")
    images = torch.randn(5, 3, 32, 32)
    res = evaluate_zeroshot(model, [(images, torch.tensor([0, 1, 2, 0, 1]))], clf, "cpu", progress=False)
    assert res["top5"] == 1.0 and res["n"] == 5
    with pytest.raises(ValueError, match="no samples"):
        evaluate_zeroshot(model, [], clf, "cpu", progress=False)
    with pytest.raises(ValueError, match="text_to_image"):
        evaluate_retrieval(model, images, tokenizer(["a", "b"]), torch.tensor([0, 5]), "cpu")


def test_bf16_paths_run_close_to_fp32():
    """The GPU precision (bf16 autocast) and a bf16-exported model, exercised on CPU."""
    model = tiny_clip()
    zs32, ret32 = run_eval(model, 0, 1)
    images, labels, texts, text_to_image = make_data(model)
    clf = build_classifier(model, CLASSNAMES, TEMPLATES, tokenizer, "cpu", autocast=True)
    for m, autocast in ((model, True), (tiny_clip().to(torch.bfloat16), False)):
        zs = evaluate_zeroshot(
            m, rank_part(images, labels, 0, 1), clf, "cpu", autocast=autocast, progress=False
        )
        ret = evaluate_retrieval(m, images, texts, text_to_image, "cpu", autocast=autocast)
        assert zs["n"] == N_IMAGES and abs(zs["top1"] - zs32["top1"]) <= 0.2
        assert abs(ret["mean_recall"] - ret32["mean_recall"]) <= 0.2


def test_two_ranks_equal_one(tmp_path):
    model = tiny_clip()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zs1, ret1 = run_eval(model, 0, 1)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0]["forwards"] == results[1]["forwards"]
    for rank, got in enumerate(results):
        for key in ("top1", "top5", "n"):
            assert got["zeroshot"][key] == zs1[key], (rank, key)
        for key, value in ret1.items():
            if key != "seconds":
                assert got["retrieval"][key] == pytest.approx(value, abs=1e-9), (rank, key)


def _worker(out_dir: Path):
    from mope_dist import dist

    info = dist.init_distributed(timeout_s=60)
    model = tiny_clip()
    model.load_state_dict(load_file(out_dir / "model.safetensors"))
    forwards = {"image": 0, "text": 0}  # ZeRO-3 needs the same forwards on every rank
    model.visual.register_forward_pre_hook(lambda *_: forwards.__setitem__("image", forwards["image"] + 1))
    model.transformer.register_forward_pre_hook(lambda *_: forwards.__setitem__("text", forwards["text"] + 1))
    zs, ret = run_eval(model, info.rank, info.world_size)
    result = {"zeroshot": zs, "retrieval": ret, "forwards": forwards}
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
