"""Checks the launchers run before starting any process: cheap and read-only (no torch).

    python -m mope_dist.recipes.preflight CONFIG.yaml [section.key=value ...]

Validates the config (mope_dist.config), then the run directory (writable, and not holding a run
with different teacher/mope/prune settings) and the labelled ImageFolder sets the job will read
(mope.proxy.data, eval.data: class folders with images, as many class names as folders). Shard-based
sets are checked by the workers when they read them (reading every shard here would be expensive).
A problem prints one line, `config error: ...`, and exits 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mope_dist.config import Config, config_from_argv
from mope_dist.errors import ConfigError
from mope_dist.mope.methods import METHODS
from mope_dist.recipes.run_dir import run_dir_problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_CLASSES = 1000


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def labelled_set_problem(key: str, data: str, classnames: str) -> str | None:
    """Why the ImageFolder set `data` cannot be used with `classnames` ('imagenet' or a file), or None."""
    root = Path(data)
    if not root.is_dir():
        return None
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        if not any(root.glob("*.tar")):
            return f"{key}: {root} holds neither class folders with images nor *.tar shards"
        return None
    empty = [c for c in classes if not _has_image(str(root / c))]
    if empty:
        return f"{key}: {len(empty)} of the {len(classes)} class folders in {root} hold no images (e.g. {empty[0]})"
    if classnames == "imagenet":
        count, source = IMAGENET_CLASSES, "open_clip's ImageNet class names"
    else:
        path = Path(classnames)
        if not path.is_file():
            return f"{key.rsplit('.', 1)[0]}.classnames: file {classnames} not found"
        count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        source = f"{classnames}"
    if count != len(classes):
        return f"{key}: {len(classes)} class folders in {root} but {count} class names in {source}"
    return None


def problems(cfg: Config) -> list[str]:
    found = [run_dir_problem(cfg)]
    proxy = cfg.mope.proxy
    if METHODS[cfg.mope.method].needs_proxy and proxy.kind == "classification" and proxy.data:
        found.append(labelled_set_problem("mope.proxy.data", proxy.data, proxy.classnames))
    if cfg.eval.data:
        found.append(labelled_set_problem("eval.data", cfg.eval.data, cfg.eval.classnames))
    return [p for p in found if p]


def main(argv: list[str]) -> None:
    cfg = config_from_argv(argv)
    found = problems(cfg)
    if found:
        print(f"config error: {found[0]}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:  # pragma: no cover - config_from_argv already reports these
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
