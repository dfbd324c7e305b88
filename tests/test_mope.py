"""MoPE scoring engine vs the naive slice-and-evaluate reference, 1 vs 2 ranks, baselines, outputs.

Run as a script (under torchrun) this file is also the 2-process worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import (  # noqa: E402
    VOCAB_SIZE as VOCAB,
)
from conftest import (
    free_port,
    randomize_,
    tiny_images,
    tiny_open_clip,
    tiny_open_clip_cfg,
    tiny_texts,
)

from mope_dist.model import (  # noqa: E402
    TowerMasks,
    count_params,
    from_open_clip,
    load_model,
    save_pretrained,
    slice_model,
)
from mope_dist.mope import engine  # noqa: E402
from mope_dist.mope.baselines import score_magnitude, score_random, score_taylor, unit_tensors  # noqa: E402
from mope_dist.mope.engine import score_mope  # noqa: E402
from mope_dist.mope.forward import StagedForward  # noqa: E402
from mope_dist.mope.proxies import ClassificationProxy, RetrievalProxy, local_batches  # noqa: E402
from mope_dist.mope.reference import score_mope_naive  # noqa: E402
from mope_dist.mope.report import ScoreResult, read_scores, write_scores  # noqa: E402
from mope_dist.mope.units import enumerate_units, keep_without, tower_of  # noqa: E402

K, M = 6, 3  # classes, templates
GROUPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waiting
    makes them 10-50x slower; one thread also matches the kernels of the 1-thread torchrun workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scoring_model():
    """Tiny seeded CLIP whose texts differ enough that zero-shot predictions vary across images."""
    model = from_open_clip(tiny_open_clip(layers=2, width=64, head_width=16)).eval()
    with torch.no_grad():  # open_clip's 0.02-std token table would make every prompt look alike
        model.text.token_embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return model


@pytest.fixture(scope="module")
def model():
    return scoring_model()


def make_proxies(model, n_images: int = 27):
    """Random images; half the labels are the model's own prediction, so removals move the count."""
    g = torch.Generator().manual_seed(1)
    class_texts = tiny_texts(K * M, seed=3).view(K, M, -1)
    images = tiny_images(n_images, seed=1)
    with torch.no_grad():
        clf = torch.nn.functional.normalize(
            model.encode_text(class_texts.view(K * M, -1), normalize=True).view(K, M, -1).mean(1), dim=-1
        )
        pred = (model.encode_image(images, normalize=True) @ clf.T).argmax(1)
    labels = torch.randint(K, (n_images,), generator=g)
    labels[::2] = pred[::2]
    cls = ClassificationProxy(images, labels, class_texts)
    n_txt = 2 * n_images - 5  # most images have two captions, a few three, the last 3 none
    ret = RetrievalProxy(
        tiny_images(n_images, seed=4), tiny_texts(n_txt, seed=5), torch.arange(n_txt) % (n_images - 3)
    )
    return cls, ret


def test_units_inventory_and_params(model):
    units = enumerate_units(model, neuron_groups=GROUPS)
    per_layer = 4 + GROUPS + 1
    assert len(units) == 2 * 2 * per_layer
    for tower in ("vision", "text"):
        for layer in range(2):
            groups = [u for u in units if u.tower == tower and u.layer == layer and u.kind == "neurons"]
            assert sorted(n for u in groups for n in u.neurons) == list(range(256))
            # magnitude grouping: every neuron of group g is at least as large as any of group g+1
            block = (model.visual if tower == "vision" else model.text).blocks[layer]
            mag = block.mlp.c_fc.weight.norm(dim=1) * block.mlp.c_proj.weight.norm(dim=0)
            for a, b in zip(groups, groups[1:], strict=False):
                assert mag[list(a.neurons)].min() >= mag[list(b.neurons)].max()
                assert list(a.neurons) == sorted(a.neurons, key=lambda i: -mag[i])
    contiguous = enumerate_units(
        model, towers=["text"], kinds=["neurons"], neuron_groups=3, grouping="contiguous"
    )
    assert [len(u.neurons) for u in contiguous[:3]] == [86, 85, 85] and contiguous[0].neurons[:2] == (0, 1)
    assert {u.kind for u in enumerate_units(model, kinds=["layer"])} == {"layer"}
    total = count_params(model)["total"]
    for u in units:
        if u.index in (0, 1):  # a sample of each kind in both towers
            assert total - count_params(slice_model(model, keep_without(model, u)))["total"] == u.params, u
            assert sum(t.numel() for t in unit_tensors(model, u)) == u.params, u


def test_local_batches_partition():
    for n, bs, world in [(27, 4, 2), (5, 8, 3), (0, 4, 2), (12, 4, 3)]:
        rows = sorted(i for r in range(world) for s, e in local_batches(n, bs, r, world) for i in range(s, e))
        assert rows == list(range(n))
        assert all(e - s == bs for r in range(world) for s, e in local_batches(n, bs, r, world)[:-1])


# gather budgets that split the text candidates' classifiers / the galleries into several passes
@pytest.mark.parametrize("kind,gather_bytes", [("classification", 3000), ("retrieval", 30000)])
def test_engine_equals_naive_reference(model, kind, gather_bytes, monkeypatch):
    """Exact integer counts of the batched, cached engine == slice each unit out and evaluate."""
    monkeypatch.setattr(engine, "_SIM_ELEMENTS", 100)  # rank one or two candidates at a time
    proxy = dict(zip(["classification", "retrieval"], make_proxies(model), strict=True))[kind]
    units = enumerate_units(model, neuron_groups=GROUPS)
    got = score_mope(
        model, units, proxy, batch_size=8, candidates_per_forward=3, gather_bytes=gather_bytes, progress=False
    )
    ref = score_mope_naive(model, units, proxy, batch_size=16)
    assert got.base_counts == ref.base_counts
    assert got.counts == ref.counts
    assert got.scores == ref.scores
    assert 0 < got.base_z < 1
    assert sum(s != 0 for s in got.scores) >= len(units) // 4, "removals should move the proxy"
    # the continuous tie-breaker: same mean log-probabilities up to float rounding
    torch.testing.assert_close(got.base_logp, ref.base_logp, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(got.logp), torch.tensor(ref.logp), atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(got.logp_drop), torch.tensor(ref.logp_drop), atol=4e-6, rtol=0)
    assert got.base_logp < 0
    assert len(set(got.scores)) < len(units) == len(set(got.logp_drop)), "top-1 ties, broken by logp"


def masked_features(tower, inputs, units):
    """Reference for the engine's shortcuts: the tower's own forward with one unit masked per
    candidate (TowerMasks, tested against physical slicing in test_model_masks)."""
    n_layers, c = len(tower.blocks), len(units)
    head, mlp, layer = [None] * n_layers, [None] * n_layers, torch.ones(c, n_layers)
    for i, u in enumerate(units):
        block = tower.blocks[u.layer]
        if u.kind == "head":
            head[u.layer] = torch.ones(c, block.num_heads) if head[u.layer] is None else head[u.layer]
            head[u.layer][i, u.index] = 0
        elif u.kind == "neurons":
            mlp[u.layer] = torch.ones(c, block.mlp_dim) if mlp[u.layer] is None else mlp[u.layer]
            mlp[u.layer][i, list(u.neurons)] = 0
        else:
            layer[i, u.layer] = 0
    feats = tower(inputs, masks=TowerMasks(head=head, mlp=mlp, layer=layer))
    return torch.nn.functional.normalize(feats, dim=-1).view(c, inputs.shape[0], -1)


@pytest.mark.parametrize(
    "vision_kw,text_kw",
    [
        (dict(), dict()),  # class-token pooling; causal text pooled at argmax
        (dict(pool="avg", layer_scale=True, act="quick_gelu"), dict(pool_type="eos", eos_id=VOCAB - 1)),
        (dict(final_ln_after_pool=True), dict(pool_type="first", no_causal_mask=True)),
        (dict(), dict(embed_cls=True)),  # appended class token with a padding mask
        (dict(), dict(pool_type="last", proj_type="none")),
    ],
    ids=["tok-argmax", "avg-eos", "lnpool-first", "embedcls", "last-noproj"],
)
def test_staged_forward_equals_masked_forward(vision_kw, text_kw):
    """Shared block parts, subtracted head / neuron shares and the pooled-only last block give the
    features of the masked forward (up to float rounding), for every unit and pooling rule."""
    cfg = tiny_open_clip_cfg(layers=3, **vision_kw)
    cfg["text_cfg"].update(text_kw)
    if text_kw.get("proj_type") == "none":
        cfg["text_cfg"].update(width=cfg["embed_dim"], heads=cfg["embed_dim"] // 16)
    torch.manual_seed(0)
    model = from_open_clip(randomize_(open_clip.CustomTextCLIP(**cfg)).eval()).eval()
    inputs = {"vision": tiny_images(5, seed=2), "text": tiny_texts(5, seed=3)}
    with torch.no_grad():
        for tower_name in ("vision", "text"):
            tower = tower_of(model, tower_name)
            base = StagedForward(tower, inputs[tower_name]).features()
            ref_base = torch.nn.functional.normalize(tower(inputs[tower_name]), dim=-1)
            torch.testing.assert_close(base, ref_base, atol=2e-6, rtol=1e-5)
            forward, by_layer = StagedForward(tower, inputs[tower_name]), defaultdict(list)
            for u in enumerate_units(model, towers=[tower_name], neuron_groups=3):
                by_layer[u.layer].append(u)
            for layer in sorted(by_layer):  # the engine visits layers in increasing order
                got = forward.candidate_features(by_layer[layer])
                ref = masked_features(tower, inputs[tower_name], by_layer[layer])
                torch.testing.assert_close(got, ref, atol=5e-6, rtol=1e-5)


def test_depth_scores_on_width_pruned_model(model):
    """Fine-tuning stage: layers only, on a model whose layers have different head/MLP counts."""
    units = enumerate_units(model, neuron_groups=GROUPS)
    keep = keep_without(model, units[0])  # vision layer 0 loses a head
    keep.vision.mlp = {1: list(range(0, 256, 2))}
    pruned = slice_model(model, keep).eval()
    cls, _ = make_proxies(pruned)
    layers = enumerate_units(pruned, kinds=["layer"])
    got = score_mope(pruned, layers, cls, batch_size=8, progress=False)
    ref = score_mope_naive(pruned, layers, cls, batch_size=16)
    assert got.counts == ref.counts and len(got.scores) == 4


def _score_saved(out_dir: Path) -> dict:
    """Both proxies' scores of the model and data saved in out_dir, loaded as every rank loads them
    (the last float bits of a matmul can depend on where its weights sit in memory: the tie-breaker's
    rounding sees them, so 1 and N ranks are compared on identically loaded models)."""
    model = load_model(out_dir / "model")
    t = load_file(out_dir / "data.safetensors")
    cls = ClassificationProxy(t["images"], t["labels"], t["class_texts"])
    ret = RetrievalProxy(t["r_images"], t["r_texts"], t["t2i"])
    units = enumerate_units(model, neuron_groups=GROUPS)
    kw = dict(batch_size=4, candidates_per_forward=4, gather_bytes=30000, progress=False)
    out = {name: score_mope(model, units, p, **kw).to_dict() for name, p in (("cls", cls), ("ret", ret))}
    # Taylor with batches so large that rank 1 holds no query and no prompt: it still all-reduces alike
    taylor = score_taylor(model, units, cls, batch_size=32)
    out["taylor"], out["taylor_loss"] = taylor.scores, taylor.meta["loss"]  # this rank's share summed
    return out


def test_two_ranks_equal_one(model, tmp_path):
    cls, ret = make_proxies(model, n_images=23)  # 23 images in batches of 4: ranks get 3 and 3 batches
    save_pretrained(model, tmp_path / "model")
    tensors = {"images": cls.images, "labels": cls.labels, "class_texts": cls.class_texts}
    tensors |= {"r_images": ret.images, "r_texts": ret.texts, "t2i": ret.text_to_image}
    save_file(tensors, tmp_path / "data.safetensors")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _score_saved(tmp_path)  # one thread, like the workers (see one_thread)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in ("cls", "ret"):
            assert got[name]["meta"]["world_size"] == 2
            assert got[name]["base_counts"] == one[name]["base_counts"]
            assert [u["counts"] for u in got[name]["units"]] == [u["counts"] for u in one[name]["units"]]
            for key in ("score", "logp", "logp_drop"):
                assert [u[key] for u in got[name]["units"]] == [u[key] for u in one[name]["units"]]
            assert got[name]["base_logp"] == one[name]["base_logp"]
        torch.testing.assert_close(
            torch.tensor(got["taylor"]), torch.tensor(one["taylor"]), rtol=1e-5, atol=0
        )
        assert got["taylor_loss"] == pytest.approx(one["taylor_loss"], rel=1e-5)


def _worker(out_dir: Path):
    from mope_dist import dist

    dist.init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    out = _score_saved(out_dir)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(out))


def _spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_baselines(model):
    cls, ret = make_proxies(model)
    units = enumerate_units(model, neuron_groups=GROUPS)
    mope = score_mope(model, units, cls, batch_size=8, progress=False)
    results = [
        score_magnitude(model, units, p=1),
        score_magnitude(model, units, p=2),
        score_random(units, seed=3),
        score_taylor(model, units, cls, batch_size=8),
        score_taylor(model, units, ret, batch_size=8),
    ]
    for r in results:
        assert len(r.scores) == len(units) and all(torch.isfinite(torch.tensor(r.scores)))
        assert r.units == units
        assert abs(_spearman(r.scores, mope.scores)) < 0.99, r.method
    assert score_random(units, seed=3).scores == results[2].scores != score_random(units, seed=4).scores
    assert all(s > 0 for s in results[0].scores)
    assert all(p.grad is None for p in model.parameters())


def test_taylor_equals_full_graph_gradient(model):
    """The two-stage gradient (features first, then towers) equals one end-to-end backward."""
    cls, _ = make_proxies(model)
    units = enumerate_units(model, neuron_groups=GROUPS)
    got = score_taylor(model, units, cls, batch_size=8)
    k, m, _ = cls.class_texts.shape
    text = model.encode_text(cls.class_texts.view(k * m, -1), normalize=True)
    classifier = torch.nn.functional.normalize(text.view(k, m, -1).mean(1), dim=-1)
    logits = model.logit_scale.exp() * model.encode_image(cls.images, normalize=True) @ classifier.T
    torch.nn.functional.cross_entropy(logits, cls.labels).backward()
    ref = [
        float(sum(t.sum() for t in unit_tensors(model, u, lambda p: (p.grad * p.detach()).abs())))
        for u in units
    ]
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(ref), rtol=1e-4, atol=1e-7)


def test_write_scores_json_png_tensorboard(model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    cls, _ = make_proxies(model)
    units = enumerate_units(model, neuron_groups=GROUPS)
    result = score_mope(model, units, cls, batch_size=8, progress=False)
    writer = SummaryWriter(tmp_path / "tb")
    path = write_scores(result, tmp_path / "scores", tb_writer=writer)
    writer.close()
    data = json.loads(path.read_text())
    assert data["format"] == "mope-dist-scores" and data["base_z"] == result.base_z
    rec = data["units"][0]
    assert set(rec) >= {"tower", "kind", "layer", "index", "neurons", "params", "score", "z", "counts"}
    assert {"logp", "logp_drop"} <= set(rec) and data["version"] == 2 and data["base_logp"] < 0
    back = read_scores(path)
    assert back.units == units and back.scores == result.scores and back.counts == result.counts
    assert back.logp_drop == result.logp_drop and back.base_logp == result.base_logp
    old = dict(data, version=1, base_logp=None, units=[{k: r[k] for k in list(r)[:9]} for r in data["units"]])
    assert ScoreResult.from_dict(old).logp_drop is None  # a version 1 file still reads
    with pytest.raises(ValueError, match="version 3 is newer"):
        ScoreResult.from_dict(dict(data, version=3))
    pngs = sorted(p.name for p in (tmp_path / "scores").glob("*.png"))
    assert pngs == [f"{t}_{k}.png" for t in ("text", "vision") for k in ("head", "layer", "neurons")]
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "scores/vision_head" in acc.Tags()["images"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_proxy_counts_match_topk_recall_count_ties_against_the_query_and_ignore_autocast():
    """Retrieval hits equal evaluation's top-k recall on distinct similarities; a gallery collapsed to
    one feature (what removing a whole tower can do) ties every query and hits nothing; both count
    functions give the same counts under bf16 autocast (the scoring engine runs the encoders so)."""
    import torch.nn.functional as F

    from mope_dist.eval.retrieval import _hits
    from mope_dist.mope.proxies import RECALL_KS, classification_counts, retrieval_counts

    g = torch.Generator().manual_seed(0)
    n_img, n_txt, d = 30, 45, 16
    owner = torch.randint(0, n_img, (n_txt,), generator=g)
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n_txt, d, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    positives = owner[:, None] == torch.arange(n_img)[None, :]  # text -> image
    counts = retrieval_counts(txt[None], img[None], positives, scale)
    top = _hits(txt, owner, img, torch.arange(n_img), max(RECALL_KS), chunk=7)
    assert counts[0, :3].tolist() == [int(top[:, :k].any(1).sum()) for k in RECALL_KS]
    collapsed = img[:1].expand(n_img, d)
    assert retrieval_counts(txt[None], collapsed[None], positives, scale)[0, :3].tolist() == [0, 0, 0]

    labels = torch.randint(0, 500, (64,), generator=g)
    feats = F.normalize(torch.randn(64, d, generator=g), dim=-1)
    classifier = F.normalize(torch.randn(500, d, generator=g), dim=-1)
    exact = classification_counts(feats[None], classifier[None], labels, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(retrieval_counts(txt[None], img[None], positives, scale), counts)
        assert torch.equal(classification_counts(feats[None], classifier[None], labels, scale), exact)


def test_proxies_refuse_indices_outside_their_images_and_classes():
    images, texts = tiny_images(4), tiny_texts(3)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"text_to_image indices must lie in \[0, 4\)"):
            RetrievalProxy(images, texts, torch.tensor([0, 1, bad]))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            ClassificationProxy(images, torch.tensor([0, 1, 2, bad]), tiny_texts(8).view(4, 2, -1))
