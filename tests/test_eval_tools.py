"""tools/eval_zeroshot.py and tools/eval_retrieval.py end to end on synthetic data: the numbers equal a
direct computation with open_clip's own classifier and module, for a model directory and an open_clip
local-dir model, from an ImageFolder or shards, in 1 or 2 processes; bad input gives one line, exit 2."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import free_port, tiny_open_clip, tiny_open_clip_cfg
from torchvision.datasets import ImageFolder

from mope_dist.data import load_retrieval_set
from mope_dist.data.synthetic import write_labelled_set, write_retrieval_set, write_tar
from mope_dist.model import from_open_clip, save_pretrained
from mope_dist.recipes.eval_cli import run_tool

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zeroshot_tool, retrieval_tool = _tool("eval_zeroshot"), _tool("eval_retrieval")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny open_clip model as local-dir: and as a mope-dist dir; a 47-image labelled set; a retrieval set."""
    root = tmp_path_factory.mktemp("evaltools")
    oc = tiny_open_clip(seed=3)
    (root / "oc").mkdir()
    (root / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_cfg()}))
    torch.save(oc.state_dict(), root / "oc" / "open_clip_pytorch_model.bin")
    save_pretrained(from_open_clip(oc), root / "student")
    write_labelled_set(root / "val48", per_class=2, shard_dir=root / "val_shards", samples_per_shard=16)
    shutil.copytree(root / "val48", root / "val")
    (root / "val" / "023_orange_cross" / "00001.jpg").unlink()  # 47 images: odd, for the 2-rank split
    write_retrieval_set(root / "ret", num_images=15, captions_per_image=3, samples_per_shard=8)
    return root, oc


def reference_zeroshot(root: Path, oc, folder: str = "val") -> dict:
    """open_clip's classifier and a plain loop over torchvision's ImageFolder."""
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root / 'oc'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{root / 'oc'}")
    classnames = (root / "val" / "classnames.txt").read_text().split("\n")[:-1]
    templates = (root / "val" / "templates.txt").read_text().split("\n")[:-1]
    dataset = ImageFolder(str(root / folder), transform=preprocess)
    top1 = top5 = 0
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(oc, tokenizer, classnames, templates)
        for image, label in dataset:
            order = (oc.encode_image(image[None], normalize=True)[0] @ classifier).argsort(descending=True)
            top1 += int(order[0]) == label
            top5 += label in order[:5].tolist()
    return {"top1": top1 / len(dataset), "top5": top5 / len(dataset), "n": len(dataset)}


def test_zeroshot_matches_open_clip(setup, tmp_path, capsys):
    root, oc = setup
    ref = reference_zeroshot(root, oc)
    assert ref["n"] == 47 and ref["top5"] > 0
    ref48 = reference_zeroshot(root, oc, "val48")
    common = ["--batch-size", "8", "--workers", "0", "--local_rank=0"]  # as the deepspeed launcher adds
    runs = {
        "dir": ["--model", root / "student", "--data", root / "val", "--output", tmp_path / "r.json"],
        "open_clip": ["--model", f"local-dir:{root / 'oc'}", "--data", root / "val"],
        "native": ["--model", f"local-dir:{root / 'oc'}", "--native", "--data", root / "val"],
        "shards": ["--model", root / "student", "--data", f"{root / 'val_shards'}/{{000000..000002}}.tar"]
        + ["--classnames", root / "val" / "classnames.txt", "--templates", root / "val" / "templates.txt"],
    }
    for name, argv in runs.items():
        got = zeroshot_tool.main([str(a) for a in argv + common])
        want = ref48 if name == "shards" else ref
        assert {k: got[k] for k in want} == pytest.approx(want), name
        assert got["num_classes"] == 24 and got["num_templates"] == 5 and got["images_per_s"] > 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(line) == got
    assert json.loads((tmp_path / "r.json").read_text())["data"] == str(root / "val")


def test_zeroshot_two_ranks_equal_one(setup, tmp_path):
    root, oc = setup
    argv = [
        "--model",
        str(root / "student"),
        "--data",
        str(root / "val"),
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    one = zeroshot_tool.main(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), str(ROOT / "tools" / "eval_zeroshot.py"), *argv]
    cmd += ["--output", str(tmp_path / "two.json")]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])  # printed by rank 0 only
    assert len(proc.stdout.strip().splitlines()) == 1
    assert two == json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert {k: two[k] for k in ("top1", "top5", "n")} == {k: one[k] for k in ("top1", "top5", "n")}


def test_retrieval_matches_naive(setup, capsys):
    root, oc = setup
    shards = f"{root / 'ret'}/{{000000..000001}}.tar"
    got = retrieval_tool.main(["--model", str(root / "student"), "--data", shards, "--batch-size", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == got
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root / 'oc'}")
    images, texts, owner = load_retrieval_set(
        shards, preprocess, open_clip.get_tokenizer(f"local-dir:{root / 'oc'}")
    )
    assert got["n_images"] == 15 and got["n_texts"] == 45 == len(owner)
    with torch.no_grad():
        sim = oc.encode_image(images, normalize=True) @ oc.encode_text(texts, normalize=True).T
    for k in (1, 5, 10):
        i2t = [bool((owner[sim[i].topk(k).indices] == i).any()) for i in range(len(images))]
        t2i = [int(owner[j]) in sim[:, j].topk(k).indices.tolist() for j in range(len(texts))]
        assert got[f"i2t_R@{k}"] == pytest.approx(sum(i2t) / len(i2t), abs=1e-6)
        assert got[f"t2i_R@{k}"] == pytest.approx(sum(t2i) / len(t2i), abs=1e-6)


def _error(tool, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_tool(tool.__name__, tool.main, [str(a) for a in argv])
    assert exc.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1 and lines[0].startswith(f"{tool.__name__}: error: "), lines
    return lines[0]


def test_errors(setup, tmp_path, capsys):
    root, _ = setup
    model = ["--model", root / "student"]
    (tmp_path / "empty" / "cls_a").mkdir(parents=True)
    jpg = next((root / "val" / "000_red_circle").iterdir()).read_bytes()
    write_tar(tmp_path / "nocaption.tar", [("000000000", {"jpg": jpg})])
    cases = [
        (zeroshot_tool, [*model, "--data", tmp_path / "missing"], f"{tmp_path / 'missing'} not found"),
        (
            zeroshot_tool,
            [*model, "--data", f"{root / 'val_shards'}/{{000000..000009}}.tar"],
            "7 of 10 shards",
        ),
        (zeroshot_tool, [*model, "--data", tmp_path / "empty"], "no valid file"),
        (
            zeroshot_tool,
            [*model, "--data", root / "val", "--classnames", "imagenet"],
            "1000 class names but 24",
        ),
        (zeroshot_tool, [*model, "--data", root / "val", "--templates", tmp_path / "t.txt"], "not found"),
        (zeroshot_tool, ["--model", "No-Such-Model", "--data", root / "val"], "unknown open_clip model"),
        (zeroshot_tool, ["--model", tmp_path / "nodir", "--data", root / "val"], "not found"),
        (zeroshot_tool, ["--model", root / "val", "--data", root / "val"], "not a mope-dist model directory"),
        (zeroshot_tool, [*model, "--pretrained", "openai", "--data", root / "val"], "--pretrained"),
        (retrieval_tool, [*model, "--data", root / "val_shards" / "nope.tar"], "nope.tar not found"),
        (retrieval_tool, [*model, "--data", tmp_path / "nocaption.tar"], "no usable image with captions"),
    ]
    for tool, argv, message in cases:
        assert message in _error(tool, argv, capsys), (argv, message)


def test_cli_error_exit_status(tmp_path):
    tool = ROOT / "tools" / "eval_zeroshot.py"
    argv = [sys.executable, str(tool), "--model", "ViT-B-32", "--data", str(tmp_path / "none")]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env=dict(os.environ, DS_ACCELERATOR="cpu")
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == f"eval_zeroshot: error: {tmp_path / 'none'} not found"
