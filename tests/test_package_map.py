"""The package map holds: no import runs back up it.

Read from the source with `ast` (every import, also those inside functions or under TYPE_CHECKING):
- the library packages import neither the recipes (entry points and their wiring) nor tools/bench/tests;
- a library package imports only packages before it in LIBRARY_ORDER (the direction data flows:
  a model is scored, the scores pruned, the student distilled);
- the shared modules (errors, utils, dist, typed_yaml, config) import no library package, except config reading
  the scoring methods' names from mope.methods;
- only dist.py and distill/ talk to torch.distributed or DeepSpeed in the library;
and, by running it, the launchers' preflight imports no torch (it runs before every launch).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mope_dist"
LIBRARY_ORDER = ("model", "data", "eval", "mope", "prune", "distill")
SHARED = ("errors", "utils", "dist", "typed_yaml", "config")
SHARED_ALLOWED = {
    "errors": set(),
    "utils": set(),
    "dist": {"mope_dist.errors"},
    "typed_yaml": {"mope_dist.errors"},
    "config": {"mope_dist.errors", "mope_dist.utils", "mope_dist.typed_yaml", "mope_dist.mope.methods"},
}
OUTSIDE_LIBRARY = ("mope_dist.recipes", "tools", "bench", "tests", "conftest")
DISTRIBUTED = ("torch.distributed", "deepspeed")


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """Absolute module names imported by `path` (`from pkg import name` also counts pkg.name)."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(name: str) -> list[Path]:
    target = PACKAGE / name
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


def within(module: str, names: tuple[str, ...] | set[str]) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in names)


def top(module: str) -> str | None:
    """The mope_dist package or module that `module` belongs to (None outside mope_dist)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mope_dist" and len(parts) > 1 else None


def test_the_map_names_every_package_and_module():
    present = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert present == set(LIBRARY_ORDER) | set(SHARED) | {"recipes", "__init__"}


@pytest.mark.parametrize("package", LIBRARY_ORDER)
def test_library_package_imports_only_what_comes_before_it(package):
    allowed = set(LIBRARY_ORDER[: LIBRARY_ORDER.index(package) + 1]) | set(SHARED)
    wrong = []
    for path in sources(package):
        for module in imports_of(path):
            if within(module, OUTSIDE_LIBRARY) or (top(module) and top(module) not in allowed):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
            if package != "distill" and within(module, DISTRIBUTED):
                wrong.append(f"{path.relative_to(REPO)} imports {module} (only dist.py and distill/ may)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_import_no_library_package(module):
    (path,) = sources(module)
    inside = {m for m in imports_of(path) if top(m)}
    # `from mope_dist.mope.methods import METHODS` also yields `mope_dist.mope.methods.METHODS`
    extra = {m for m in inside if not within(m, SHARED_ALLOWED[module])}
    assert not extra, f"{path.relative_to(REPO)} imports {sorted(extra)}"


def test_imports_of_reads_the_forms_the_rules_rely_on(tmp_path):
    # the checker itself: relative, `from pkg import module`, function-local and TYPE_CHECKING imports
    pkg = tmp_path / "mope_dist" / "mope"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import units\nfrom ..model import spec\n"
        "from mope_dist import recipes\nif TYPE_CHECKING:\n    import deepspeed\n"
        "def f():\n    from mope_dist.recipes.run_dir import prepare_run_dir\n"
    )
    found = imports_of(pkg / "x.py", root=tmp_path)
    for module in ("mope_dist.mope.units", "mope_dist.model.spec", "mope_dist.recipes", "deepspeed"):
        assert module in found
    assert "mope_dist.recipes.run_dir" in found and top("mope_dist.recipes.run_dir") == "recipes"


def test_preflight_imports_no_torch():
    code = (
        "import sys, mope_dist.recipes.preflight, mope_dist.config; "
        "print(sorted(m for m in ('torch', 'open_clip', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
