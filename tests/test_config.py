"""Config errors: each kind stops with one line naming the key and its source, exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from mope_dist.config import load_config, save_config, validate_targets
from mope_dist.errors import ConfigError

BASE = """
data:
  batch_size: 64
distill:
  grad_accum: 2
prune:
  vision: {layers: 2, heads: 0.5}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    return path


def test_loads_types_and_overrides(recipe):
    cfg = load_config(
        recipe, ["distill.steps=7", "deepspeed.zero_stage=3", "distill.losses.kd=0.5", "distill.lr=1e-4"]
    )
    assert cfg.distill.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string; floats accept it
    assert cfg.data.batch_size == 64
    assert cfg.distill.steps == 7 and cfg.deepspeed.zero_stage == 3
    assert cfg.distill.losses.kd == 0.5
    # ints stay absolute counts, floats stay ratios
    assert cfg.prune.vision.layers == 2 and isinstance(cfg.prune.vision.layers, int)
    assert cfg.prune.vision.heads == 0.5


def test_resolved_config_round_trips(recipe, tmp_path):
    cfg = load_config(recipe, ["eval.max_per_class=3"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    "override, key, source",
    [
        (["data.bogus=1"], "unknown key data.bogus", "the command line"),
        (["nosection.x=1"], "unknown key nosection", "the command line"),
        (["data.batch_size=abc"], "data.batch_size", "the command line"),
        (["data.batch_size=true"], "data.batch_size", "the command line"),
        (["deepspeed.zero_stage=5"], "deepspeed.zero_stage", "the command line"),
        (["eval.data=/does/not/exist"], "eval.data", "the command line"),
        (["teacher.name=local-dir:/does/not/exist"], "teacher.name", "the command line"),
        (["teacher.pretrained=/no/weights.pt"], "teacher.pretrained", "the command line"),
        (["teacher.name=runs/missing/final"], "teacher.name", "the command line"),
        (["prune.text.mlp=1.5"], "prune.text.mlp", "the command line"),
        (["prune.text.layers=0"], "prune.text.layers", "the command line"),
        (["distill.grad_accum=3"], "data.batch_size", "recipe.yaml"),
        (["distill.lr=-1"], "distill.min_lr", "recipe.yaml"),
        (["mope.towers=[audio]"], "mope.towers[0]", "the command line"),
        (["data.image_dtype=float16"], "data.image_dtype", "the command line"),
        (["distill.compile=maybe"], "distill.compile", "the command line"),
        (["data.decode=device", "data.image_dtype=float32"], "data.decode", "the command line"),
        (["deepspeed.precision=amp_fp16"], "deepspeed.precision", "the command line"),
        (["prune.width_multiple=0"], "prune.width_multiple", "the command line"),
        (
            ["deepspeed.extra={gradient_clipping: 1.0}"],
            "deepspeed.extra.gradient_clipping",
            "the command line",
        ),
        (
            ["deepspeed.extra={torch_autocast: {dtype: float16}}"],
            "deepspeed.extra.torch_autocast",
            "the command line",
        ),
        (
            ["deepspeed.extra={zero_optimization: {stage: 3}}"],
            "deepspeed.extra.zero_optimization.stage",
            "the command line",
        ),
        (["distill.profile_steps=-1"], "distill.profile_steps", "the command line"),
        (
            ["distill.profile_steps=4", "distill.profile_start=1000000"],
            "distill.profile_steps",
            "the command line",
        ),
    ],
)
def test_each_error_names_key_and_source(recipe, override, key, source):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, override)
    message = str(err.value)
    assert key in message and source in message and "\n" not in message


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key distill.stepz in .*bad.yaml"):
        load_config(path)


def test_target_wider_than_teacher(recipe):
    cfg = load_config(recipe, ["prune.vision.heads=12"])
    limits = dict(
        layers={"vision": 4, "text": 4}, heads={"vision": 8, "text": 8}, mlp={"vision": 256, "text": 256}
    )
    with pytest.raises(ConfigError, match="prune.vision.heads: target 12 is larger than the teacher's 8"):
        validate_targets(cfg, **limits)


def test_entry_point_exits_2_with_one_line(recipe):
    code = "import sys; from mope_dist.config import config_from_argv; config_from_argv(sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(recipe), "data.workers=-1"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.workers" in lines[0]


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=str)
def test_shipped_recipes_are_valid(recipe, tmp_path):
    """Every recipe in configs/ parses with its own keys; only its data paths are pointed at tmp_path."""
    (tmp_path / "teacher").mkdir()
    paths = ["data.train_shards", "mope.proxy.data", "eval.data", "mope.proxy.classnames", "eval.classnames"]
    overrides = [f"{key}={tmp_path}" for key in paths] + [f"teacher.name={tmp_path / 'teacher'}"]
    overrides += ["mope.proxy.templates=simple", "eval.templates=simple"]
    cfg = load_config(recipe, overrides)
    assert cfg.distill.steps > 0 and cfg.output.dir
