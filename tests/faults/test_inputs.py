"""Bad inputs are refused before any expensive work, with one clear line and a non-zero exit:
teacher weights that do not fit the model, a proxy/eval set without images or with the wrong number
of class names, a plan that removes a whole tower or every head of a layer, an output dir that
belongs to another run or cannot be written. Most checks run in-process; one goes through
launch/pretrain.sh to show the launcher stops before starting any process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import tiny_open_clip, tiny_open_clip_cfg
from safetensors.torch import save_file

from faults.conftest import REPO, jpeg, launcher_env, make_teacher, write_recipe
from mope_dist import dist
from mope_dist.config import load_config
from mope_dist.errors import ConfigError
from mope_dist.model import KeepSpec, load_teacher
from mope_dist.mope.units import enumerate_units
from mope_dist.prune.plan import check_plan, make_plan
from mope_dist.recipes.builders import build_proxy
from mope_dist.recipes.preflight import problems
from mope_dist.recipes.run_dir import prepare_run_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_teacher(root / "teacher")
    (root / "train").mkdir()
    return root


def image_folder(path: Path, classes: int, per_class: int = 1) -> Path:
    for c in range(classes):
        (path / f"{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            (path / f"{c:03d}" / f"{i}.jpg").write_bytes(jpeg(i))
    (path / "classnames.txt").write_text("".join(f"class {c}\n" for c in range(classes)))
    return path


def cfg_for(root: Path, name: str, **sections):
    sections.setdefault("output", {"dir": str(root / name)})
    return load_config(write_recipe(root, f"{name}.yaml", **sections))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------
# teacher


@pytest.fixture(scope="module")
def registered_tiny(tmp_path_factory):
    """An open_clip model name for a tiny config, and weights of another (narrower) tiny model."""
    d = tmp_path_factory.mktemp("oc")
    (d / "mope-faults-tiny.json").write_text(json.dumps(tiny_open_clip_cfg(width=64)))
    open_clip.add_model_config(d / "mope-faults-tiny.json")
    other = tiny_open_clip(width=32, head_width=16).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(d / "other.safetensors"))
    torch.save(other, d / "other.pt")
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    return d


@pytest.mark.parametrize("weights", ["other.safetensors", "other.pt", "garbage.pt"])
def test_teacher_weights_that_do_not_fit_the_model_name(registered_tiny, weights):
    path = str(registered_tiny / weights)
    with pytest.raises(ConfigError) as err:
        load_teacher("mope-faults-tiny", path)
    line, status = dist.failure_line(err.value)
    assert status == 2 and "\n" not in line
    assert line.startswith(f"config error: teacher weights '{path}' cannot be loaded into open_clip model")


def test_pretrained_weights_beside_a_local_dir_model_are_refused(registered_tiny, tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_cfg()}))
    with pytest.raises(ConfigError, match="would be ignored by open_clip"):  # open_clip: random weights
        load_teacher(f"local-dir:{tmp_path}", str(registered_tiny / "other.pt"))


def test_entry_point_stops_on_bad_teacher_weights_before_any_work(root, registered_tiny, monkeypatch):
    from mope_dist.recipes import pretrain

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs the project's hook
    cfg_path = write_recipe(
        root,
        "bad_teacher.yaml",
        teacher={"name": "mope-faults-tiny", "pretrained": str(registered_tiny / "other.safetensors")},
        output={"dir": str(root / "bad_teacher")},
    )
    with pytest.raises(ConfigError) as err:
        pretrain.main([str(cfg_path)])
    assert dist.failure_line(err.value)[1] == 2
    assert sorted(p.name for p in (root / "bad_teacher").iterdir()) == ["config.yaml"]  # no scores etc.


# ------------------------------------------------------------------------------------------------
# proxy / eval sets


def test_proxy_set_without_images(root, capsys):
    data = image_folder(root / "empty_proxy", classes=3, per_class=0)
    cfg = cfg_for(
        root,
        "empty_proxy_run",
        mope={"method": "mope", "proxy": {"data": str(data), "classnames": str(data / "classnames.txt")}},
    )
    (found,) = problems(cfg)
    assert found == f"mope.proxy.data: 3 of the 3 class folders in {data} hold no images (e.g. 000)"
    with pytest.raises(ConfigError, match=r"mope\.proxy .*Found no valid file"):
        build_proxy(cfg.mope.proxy, lambda img: torch.zeros(3, 8, 8), lambda t: torch.zeros(len(t), 4))


def test_classnames_that_do_not_match_the_class_count(root):
    data = image_folder(root / "proxy4", classes=4)
    (root / "three.txt").write_text("a\nb\nc\n")
    cfg = cfg_for(
        root,
        "classnames_run",
        mope={"method": "mope", "proxy": {"data": str(data), "classnames": str(root / "three.txt")}},
        eval={"data": str(data), "classnames": "imagenet"},
    )
    assert problems(cfg) == [
        f"mope.proxy.data: 4 class folders in {data} but 3 class names in {root / 'three.txt'}",
        f"eval.data: 4 class folders in {data} but 1000 class names in open_clip's ImageNet class names",
    ]
    with pytest.raises(ConfigError, match="3 class names but 4 class folders"):
        build_proxy(cfg.mope.proxy, lambda img: torch.zeros(3, 8, 8), lambda t: torch.zeros(len(t), 4))


# ------------------------------------------------------------------------------------------------
# plans


@pytest.fixture(scope="module")
def teacher(root):
    return load_teacher(str(root / "teacher"))[0]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"vision": {"layers": []}}, "plan for the vision tower keeps no layer"),
        ({"text": {"layers": [0, 1], "heads": {"1": []}}}, "plan removes every head of text layer 1"),
        ({"vision": {"layers": [1], "mlp": {"1": []}}}, "plan removes every MLP neuron of vision layer 1"),
    ],
)
def test_hand_edited_plan_that_empties_a_tower_or_a_layer(teacher, edit, message):
    plan = {"vision": {"layers": [0, 1]}, "text": {"layers": [0, 1]}}
    plan.update(edit)
    with pytest.raises(ConfigError, match=message):
        check_plan(KeepSpec.from_dict(plan), teacher.spec)


def test_global_allocation_without_scores_for_a_layer_is_refused(root, teacher):
    units = [u.to_dict() for u in enumerate_units(teacher, neuron_groups=4)]
    scores = [dict(u, score=float(i)) for i, u in enumerate(units) if (u["kind"], u["layer"]) != ("head", 1)]
    cfg = cfg_for(root, "plan_run", prune={"allocation": "global", "vision": {"heads": 0.5}})
    with pytest.raises(ConfigError, match="removes every head of vision layer 1"):
        make_plan(teacher.spec, scores, {"vision": cfg.prune.vision, "text": cfg.prune.text}, "global")


# ------------------------------------------------------------------------------------------------
# output dir


def test_output_dir_of_another_run_is_refused(root, capsys):
    cfg = cfg_for(root, "owned")
    prepare_run_dir(cfg)
    other = load_config(root / "owned.yaml", ["prune.text.mlp=0.25"])
    assert problems(other) == [
        f"output.dir {root / 'owned'} holds a run with different prune settings: use a new output.dir "
        "or set output.overwrite=true"
    ]
    with pytest.raises(SystemExit) as exit_:
        prepare_run_dir(other)
    assert exit_.value.code == 2
    assert one_line(capsys).startswith("config error: output.dir")


def test_unwritable_output_dir(root, capsys):
    (root / "a_file").write_text("a regular file where a directory should be")  # root ignores chmod
    cfg = cfg_for(root, "unwritable", output={"dir": str(root / "a_file" / "run")})
    assert problems(cfg) == [
        f"output.dir {root / 'a_file' / 'run'}: {root / 'a_file'} exists and is not a directory"
    ]
    with pytest.raises(SystemExit) as exit_:
        prepare_run_dir(cfg)
    assert exit_.value.code == 2 and "is not a directory" in one_line(capsys)


def test_launcher_stops_before_starting_any_process(root):
    data = image_folder(root / "proxy2", classes=2)
    recipe = write_recipe(
        root,
        "launch_bad.yaml",
        mope={"method": "mope", "proxy": {"data": str(data), "classnames": "imagenet"}},
        output={"dir": str(root / "launch_bad")},
    )
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "launch/pretrain.sh", str(recipe)],
        cwd=REPO, env=launcher_env(NPROC_PER_NODE=2), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"config error: mope.proxy.data: 2 class folders in {data} but 1000 class names in open_clip's "
        "ImageNet class names"
    )
    assert "deepspeed" not in proc.stdout + proc.stderr and not (root / "launch_bad").exists()
    assert time.monotonic() - start < 60
