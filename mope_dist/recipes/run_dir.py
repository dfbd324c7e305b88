"""The run directory rule: one `output.dir` per job, refusing to mix runs that disagree on what they made.

Layout: config.yaml (resolved), scores/, plan.json, pruned/, checkpoints/, tensorboard/, final/,
metrics.jsonl. The sections that decide scores, plan and pruned model (ARTIFACT_SECTIONS) must match
an existing run's; training settings may change between restarts (more steps), with a warning.
Used by the launchers' preflight too, so this module imports neither torch nor the library packages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from mope_dist.config import Config, save_config
from mope_dist.errors import ConfigError
from mope_dist.utils import get_logger

log = get_logger("mope_dist.recipes")

# The sections that decide scores, plan and pruned model: they must match an existing run's.
ARTIFACT_SECTIONS = ("teacher", "mope", "prune")


def changed_sections(cfg: Config) -> list[str]:
    """The top-level config sections that differ from the run already in output.dir (none for a new
    dir, or with output.overwrite); an unreadable config.yaml there is a ConfigError."""
    out = Path(cfg.output.dir)
    previous_path = out / "config.yaml"
    if cfg.output.overwrite or not previous_path.is_file():
        return []
    try:
        previous = yaml.safe_load(previous_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"output.dir {out}: cannot read its config.yaml ({e})") from None
    current = cfg.to_dict()
    return [k for k in current if previous.get(k) != current[k]]


def run_dir_problem(cfg: Config) -> str | None:
    """Why cfg.output.dir cannot hold this run, or None."""
    out = Path(cfg.output.dir)
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"output.dir {out}: {existing} exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output.dir {out}: {existing} is not writable"
    try:
        changed = [s for s in changed_sections(cfg) if s in ARTIFACT_SECTIONS]
    except ConfigError as e:
        return str(e)
    if changed:
        return (
            f"output.dir {out} holds a run with different {', '.join(changed)} settings: "
            "use a new output.dir or set output.overwrite=true"
        )
    return None


def prepare_run_dir(cfg: Config) -> Path:
    """Check `cfg.output.dir` against a previous run's config, then write the resolved config (rank 0).
    Collective: every rank gets the same verdict, and a refusal is one line and exit 2."""
    from mope_dist import dist  # here, not above: preflight imports this module and must stay light

    out = Path(cfg.output.dir)
    error = None
    if dist.is_main():
        try:
            problem = run_dir_problem(cfg)
            if problem:
                raise ConfigError(problem)
            others = [s for s in changed_sections(cfg) if s not in ARTIFACT_SECTIONS]
            if others:
                log.warning("resuming %s with changed settings: %s", out, ", ".join(others))
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        except (ConfigError, OSError) as e:
            error = (
                f"config error: {e}" if isinstance(e, ConfigError) else f"cannot write output.dir {out}: {e}"
            )
    error = dist.broadcast_object(error)
    if error:
        if dist.is_main():
            print(error, file=sys.stderr)
        raise SystemExit(2)
    return out
