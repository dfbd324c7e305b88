"""Turn a DeepSpeed checkpoint of a distillation run into a standalone student directory.

    python tools/convert_checkpoint.py RUN_DIR OUT_DIR [--tag TAG] [--dtype fp32|bf16|fp16] [--overwrite]

RUN_DIR is a run's output_dir (or its checkpoints/ folder, or one tag folder inside it). The student's
architecture comes from RUN_DIR/pruned/config.json (override with --student-config); the weights from
checkpoints/<tag>/ (default: the tag named in checkpoints/latest). A tag the trainer did not mark
complete (mope_complete.json: a save that broke off) is refused, and so is one whose files no longer
match the sizes and CRC-32 checksums the marker lists (one line naming the file). No process group is
started.

ZeRO 1-3: DeepSpeed's own zero_to_fp32 merges the fp32 master partitions; it reads the optimizer
shards with torch.load(weights_only=True) here (mope_dist.distill.checkpoint.weights_only_loading: only
the few DeepSpeed classes those files hold are allowed), never with pickle. ZeRO stage 0 has no
optimizer shards: its weights are the module state in mp_rank_00_model_states.pt, read with
torch.load(weights_only=True); a stage-0 bf16/fp16 run therefore exports the bf16/fp16 working weights
(upcast exactly when --dtype fp32).

The output (model.safetensors + config.json) is written atomically, loaded back and compared tensor by
tensor with the checkpoint. One JSON summary line goes to stdout; errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from mope_dist.distill.checkpoint import MARKER, damaged_file
from mope_dist.distill.safe_load import weights_only_loading
from mope_dist.model import CLIPSpec, count_params, load_model, save_pretrained
from mope_dist.model.clip import build_on_meta
from mope_dist.model.io import read_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGE0_FILE = "mp_rank_00_model_states.pt"


class ConvertError(Exception):
    """A problem with the user's input, reported as one line."""


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*_model_states.pt")))


def resolve_checkpoint(path: Path, tag: str | None) -> tuple[Path, Path, str]:
    """-> (run_dir, tag_dir, tag) from a run dir, its checkpoints/ folder, or a tag folder."""
    if not path.is_dir():
        raise ConvertError(f"{path} is not a directory")
    if any(path.glob("*_model_states.pt")):  # a tag folder itself
        if tag is not None and tag != path.name:
            raise ConvertError(f"{path} is the checkpoint of tag {path.name!r}, but --tag {tag!r} was given")
        root, tag = path.parent, path.name
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        available = _tags(root)
        if not available:
            raise ConvertError(
                f"{path} is not a DeepSpeed checkpoint directory (no <tag>/*_model_states.pt found)"
            )
        if tag is None:
            latest = root / "latest"
            if not latest.is_file():
                raise ConvertError(
                    f"no 'latest' file in {root}; pass --tag (available: {', '.join(available)})"
                )
            tag = latest.read_text().strip()
        if tag not in available:
            raise ConvertError(f"tag {tag!r} not found in {root} (available: {', '.join(available)})")
    check_complete(root, tag)
    return root.parent, root / tag, tag


def check_complete(root: Path, tag: str) -> None:
    """The trainer marks a tag complete only after every rank saved, with each file's size and checksum;
    refuse a tag whose save broke off or whose files changed since. Checkpoints written by plain
    DeepSpeed carry no marker at all and are taken as they are."""
    tag_dir = root / tag
    if (tag_dir / MARKER).is_file():
        problem = damaged_file(tag_dir)
        if problem:
            raise ConvertError(f"checkpoint {tag_dir} is incomplete or damaged: {problem}")
        return
    complete = [t for t in _tags(root) if (root / t / MARKER).is_file()]
    if complete:
        raise ConvertError(
            f"checkpoint {tag_dir} has no {MARKER}: its save did not finish (marked tags: {', '.join(complete)})"
        )


def read_checkpoint(tag_dir: Path) -> tuple[dict[str, torch.Tensor], int | None, dict]:
    """-> (state dict, ZeRO stage or None if unknown, metadata such as global_steps)."""
    if any(tag_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed prints progress; stdout carries the summary
        with contextlib.redirect_stdout(sys.stderr), weights_only_loading():
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name)
        model_file = next(iter(sorted(tag_dir.glob("*_model_states.pt"))))
        try:
            meta = torch.load(model_file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # metadata is optional here; the weights came from DeepSpeed's converter
            meta = {}
        stage = (meta.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
    else:
        model_file = tag_dir / STAGE0_FILE
        if not model_file.is_file():
            raise ConvertError(f"{tag_dir} has neither ZeRO optimizer shards nor {STAGE0_FILE}")
        try:
            meta = torch.load(model_file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConvertError(f"cannot read {model_file} without pickle: {first}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("module"), dict):
            raise ConvertError(f"{model_file} holds no module state")
        state, stage = meta["module"], 0
    steps = {k: meta[k] for k in ("global_steps", "global_samples") if isinstance(meta.get(k), int)}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, stage, steps


def fit_scalars(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reshape one-element tensors to the model's shape: DeepSpeed 0.19.8 cannot hold a 0-dim parameter
    (it broadcasts each as p.view(torch.uint8)), so a trainer may keep logit_scale as shape [1]."""
    return {
        k: v.reshape(expected[k]) if k in expected and v.numel() == 1 and expected[k].numel() == 1 else v
        for k, v in state.items()
    }


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path) -> None:
    """Fail with one line if the checkpoint and the student architecture disagree."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = [
        f"{len(n)} {what} tensors (e.g. {n[0]})"
        for what, n in (("missing", missing), ("unexpected", unexpected))
        if n
    ]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != tuple(s)
    ]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConvertError(
            f"checkpoint does not match the student in {source}: {'; '.join(problems[:3])}{more}"
        )


def student_config(run_dir: Path, override: Path | None) -> tuple[dict, Path]:
    path = override or run_dir / "pruned"
    path = path.parent if path.name == "config.json" else path
    if not (path / "config.json").is_file():
        hint = "" if override else " (pass --student-config DIR)"
        raise ConvertError(f"no student architecture: {path / 'config.json'} not found{hint}")
    try:
        return read_config(path), path / "config.json"
    except (ValueError, json.JSONDecodeError) as e:
        raise ConvertError(str(e)) from e


def convert(
    path: Path,
    out: Path,
    tag: str | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    student: Path | None = None,
) -> dict:
    """Convert, write, verify; returns the summary printed by the CLI."""
    run_dir, tag_dir, tag = resolve_checkpoint(path, tag)
    config, config_path = student_config(run_dir, student)
    if out.exists() and not overwrite:
        raise ConvertError(f"output {out} already exists (pass --overwrite to replace it)")
    spec = CLIPSpec.from_dict(config["spec"])
    model = build_on_meta(spec)
    state, stage, steps = read_checkpoint(tag_dir)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = fit_scalars(state, expected)
    check_shapes(state, expected, config_path)
    target = DTYPES[dtype]
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    provenance = dict(config.get("provenance") or {})
    provenance["converted_from"] = {
        "checkpoint": str(tag_dir.resolve()),
        "tag": tag,
        "zero_stage": stage,
        **steps,
    }
    provenance["dtype"] = dtype
    save_pretrained(model, out, provenance=provenance, overwrite=overwrite)

    loaded = load_model(out).state_dict()
    bad = [k for k, v in state.items() if not (loaded[k].dtype == v.dtype and torch.equal(loaded[k], v))]
    if bad or loaded.keys() != state.keys():
        raise RuntimeError(f"written model differs from the checkpoint in {bad[:3] or 'its keys'}")
    return {
        "output": str(out),
        "tag": tag,
        "zero_stage": stage,
        "dtype": dtype,
        "params": count_params(spec),
        "tensors": len(state),
        **steps,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="run output_dir, its checkpoints/ folder, or a tag folder")
    ap.add_argument("out_dir", type=Path, help="standalone model directory to write")
    ap.add_argument("--tag", help="checkpoint tag (default: the one in checkpoints/latest)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the output")
    ap.add_argument("--student-config", type=Path, help="model dir or config.json (default RUN_DIR/pruned)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    try:
        summary = convert(
            args.run_dir, args.out_dir, args.tag, args.dtype, args.overwrite, args.student_config
        )
    except ConvertError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {summary['output']} from tag {summary['tag']} (ZeRO stage {summary['zero_stage']}): "
        f"{summary['params']['total']:,} parameters, {summary['dtype']}",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
