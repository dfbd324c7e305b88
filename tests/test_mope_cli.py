"""`python -m mope_dist.recipes.score`: config -> scores.json, heatmaps, TensorBoard; bad config -> exit 2."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_open_clip  # noqa: E402

from mope_dist.config import load_config  # noqa: E402
from mope_dist.data.synthetic import write_demo_data, write_labelled_set, write_retrieval_set  # noqa: E402
from mope_dist.model import from_open_clip, load_teacher, save_pretrained  # noqa: E402
from mope_dist.mope.baselines import score_magnitude, score_random, score_taylor  # noqa: E402
from mope_dist.mope.engine import score_mope  # noqa: E402
from mope_dist.mope.methods import METHODS  # noqa: E402
from mope_dist.mope.report import read_scores  # noqa: E402
from mope_dist.mope.units import enumerate_units  # noqa: E402
from mope_dist.recipes.builders import build_proxy  # noqa: E402
from mope_dist.recipes.score import main  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add OpenMP overhead
    save_pretrained(from_open_clip(tiny_open_clip(layers=2, width=64, head_width=16)), root / "model")
    write_labelled_set(root / "val", per_class=2)
    retrieval = write_retrieval_set(root / "retrieval", num_images=10, captions_per_image=2)
    config = {
        "teacher": {"name": str(root / "model")},
        "mope": {
            "neuron_groups": 2,
            "candidates_per_forward": 4,
            "proxy": {
                "kind": "classification",
                "data": str(root / "val"),
                "classnames": str(root / "val" / "classnames.txt"),
                "templates": str(root / "val" / "templates.txt"),
                "batch_size": 16,
            },
        },
        "output": {"dir": str(root / "run")},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    yield root, retrieval
    torch.set_num_threads(threads)


def test_cli_writes_scores_heatmaps_tensorboard(setup, capsys):
    root, _ = setup
    main(["--config", str(root / "cfg.yaml")])
    assert "scored 28 units (mope, base Z" in capsys.readouterr().out
    result = read_scores(root / "run" / "scores" / "scores.json")
    assert len(result.units) == 2 * 2 * (4 + 2 + 1) and result.meta["proxy"] == "classification"
    assert 0 < result.base_z <= 1 and result.meta["totals"] == [2 * 24]  # 24 classes x 2 images
    assert len(list((root / "run" / "scores").glob("*.png"))) == 6
    assert list((root / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((root / "run" / "config.yaml").read_text())["mope"]["neuron_groups"] == 2


def test_cli_retrieval_depth_only_and_baseline(setup):
    root, retrieval = setup
    out = root / "run_ret"
    overrides = [f"output.dir={out}", "mope.proxy.kind=retrieval", f"mope.proxy.data={retrieval}"]
    main(["--config", str(root / "cfg.yaml"), *overrides, "mope.kinds=[layer]", "mope.towers=[text]"])
    data = json.loads((out / "scores" / "scores.json").read_text())
    assert [(u["tower"], u["kind"], u["layer"]) for u in data["units"]] == [
        ("text", "layer", 0),
        ("text", "layer", 1),
    ]
    assert data["meta"]["totals"] == [10, 10, 10, 20, 20, 20]
    main(["--config", str(root / "cfg.yaml"), f"output.dir={root / 'run_mag'}", "mope.method=magnitude"])
    assert read_scores(root / "run_mag" / "scores" / "scores.json").method == "magnitude-l1"


def test_cli_rounds_score_towards_the_targets(setup):
    """mope.rounds=2 with prune targets: the units the first round removed are marked round 1, the
    rest were rescored on the reduced model (round 2), and the file's meta says so."""
    root, _ = setup
    out = root / "run_rounds"
    main(
        [
            "--config",
            str(root / "cfg.yaml"),
            f"output.dir={out}",
            "mope.rounds=2",
            "prune.vision={heads: 2, mlp: 0.5}",
            "prune.text={layers: 1}",
        ]
    )
    result = read_scores(out / "scores" / "scores.json")
    assert result.meta["rounds"] == 2 and len(result.meta["round_base_z"]) == 2
    first = sorted(
        (u.tower, u.layer, u.kind) for u, r in zip(result.units, result.round, strict=True) if r == 1
    )
    # round 1 removes 1 of the 2 heads to go per vision layer; not yet a text layer (1 to go, in 2
    # steps) nor a neuron group (half of one group to go: partial plans remove whole groups only)
    assert first == [("vision", 0, "head"), ("vision", 1, "head")]
    assert result.logp_drop is not None and result.meta["round_units"] == [28, 26]


def test_demo_data_keeps_the_proxy_apart_from_the_evaluation_sets(tmp_path):
    paths = write_demo_data(
        tmp_path,
        train_samples=8,
        val_per_class=2,
        proxy_per_class=2,
        retrieval_images=6,
        retrieval_proxy_images=6,
    )
    val = {p.read_bytes() for p in Path(paths["val"]).glob("*/*.jpg")}
    proxy = {p.read_bytes() for p in Path(paths["proxy"]).glob("*/*.jpg")}
    assert len(val) == len(proxy) == 2 * 24 and not val & proxy
    assert (Path(paths["proxy"]) / "classnames.txt").read_text() == (
        Path(paths["val"]) / "classnames.txt"
    ).read_text()
    images = {}
    for split in ("retrieval", "retrieval_proxy"):
        with tarfile.open(paths[split]) as tar:
            images[split] = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    assert len(images["retrieval"]) == len(images["retrieval_proxy"]) == 6
    assert not images["retrieval"] & images["retrieval_proxy"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("mope.proxy.data=", "mope.proxy.data is required"),
        ("mope.kinds=[heads]", "mope.kinds[0]"),
        ("mope.method=fisher", "mope.method"),
        ("mope.rounds=0", "mope.rounds"),
    ],
)
def test_cli_bad_config_exits_2(setup, capsys, override, message):
    root, _ = setup
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(root / "cfg.yaml"), override])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_method_passes_the_config_to_its_library_function(setup, name):
    """Each registry entry scores exactly as its library function called with the recipe's values
    (proxy batch 16, 4 candidates per forward, seed 3); a new method needs its reference here."""
    root, _ = setup
    cfg = load_config(root / "cfg.yaml", [f"mope.method={name}", "mope.seed=3", "mope.kinds=[head]"])
    model, _, preprocess, tokenizer = load_teacher(str(root / "model"))
    units = enumerate_units(model, ["vision", "text"], ["head"], 2)
    proxy = build_proxy(cfg.mope.proxy, preprocess, tokenizer)
    reference = {
        "mope": lambda: score_mope(model, units, proxy, "cpu", batch_size=16, candidates_per_forward=4),
        "magnitude": lambda: score_magnitude(model, units),
        "random": lambda: score_random(units, seed=3),
        "taylor": lambda: score_taylor(model, units, proxy, "cpu", batch_size=16),
    }[name]()
    method = METHODS[name]
    result = method.score(model, units, proxy if method.needs_proxy else None, "cpu", cfg.mope)
    assert method.needs_proxy == (name in ("mope", "taylor"))
    assert (result.method, result.units, result.scores) == (
        reference.method,
        reference.units,
        reference.scores,
    )
