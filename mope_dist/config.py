"""Typed run configuration: YAML file + `section.key=value` overrides, validated before any work.

Every error names the offending key and where it came from (the YAML file or the command line) in
one line; entry points turn `ConfigError` into exit status 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mope_dist.errors import ConfigError
from mope_dist.utils import atomic_write_text


def _is_local_path(value: str) -> bool:
    """Paths we can check up front; URLs, pipes and brace patterns are checked when opened."""
    return not ("://" in value or value.startswith("pipe:") or "{" in value or "::" in value)


@dataclass
class TeacherConfig:
    # open_clip model name (e.g. ViT-L-14), `local-dir:DIR`, or a standalone mope-dist model directory.
    name: str = ""
    # open_clip pretrained tag (needs network) or a local weights file.
    pretrained: str | None = None


@dataclass
class DataConfig:
    # Training image-text shards: braces, `::`-joined sources, fsspec URLs, `pipe:COMMAND` (the command
    # runs in a shell with this job's permissions: only use specs you trust).
    train_shards: str = ""
    mode: Literal["resampled", "finite"] = "resampled"
    # Samples in one (virtual) epoch; needed when shards carry no sizes.json.
    samples_per_epoch: int | None = None
    # Global batch per optimizer step; split over ranks and gradient-accumulation micro-steps.
    batch_size: int = 256
    workers: int = 2
    seed: int = 0
    # Stop training when more than this fraction of the samples read so far (all ranks) was unusable
    # (missing image or caption, undecodable image); 1 never stops.
    max_skip_rate: float = 0.1


@dataclass
class ProxyConfig:
    """The cross-modal zero-shot proxy Z used by the MoPE metric."""

    kind: Literal["classification", "retrieval"] = "classification"
    # Classification: ImageFolder dir or shards with `cls`; retrieval: image-text shards.
    data: str = ""
    classnames: str = "imagenet"
    templates: str = "openai"
    max_per_class: int | None = None
    batch_size: int = 256


@dataclass
class MopeConfig:
    method: Literal["mope", "magnitude", "random", "taylor"] = "mope"
    towers: list[str] = field(default_factory=lambda: ["vision", "text"])
    kinds: list[str] = field(default_factory=lambda: ["head", "neurons", "layer"])
    # FFN neurons are scored in this many groups per layer.
    neuron_groups: int = 16
    # Candidates evaluated in one batched forward.
    candidates_per_forward: int = 8
    # Iterative scoring: remove each prune target's lowest units in this many steps, re-scoring the
    # remaining units of the reduced model each round (1: the paper's one-shot scores). Costs up to
    # `rounds` times the scoring time (less: later rounds score a smaller model).
    rounds: int = 1
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    seed: int = 0


@dataclass
class TowerTarget:
    """What to keep in one tower. Floats in (0, 1] are keep-ratios, ints are absolute counts; null keeps all."""

    layers: int | float | None = None
    heads: int | float | None = None
    mlp: int | float | None = None


@dataclass
class PruneConfig:
    vision: TowerTarget = field(default_factory=TowerTarget)
    text: TowerTarget = field(default_factory=TowerTarget)
    # uniform: the same head/MLP count in every kept layer; global: rank units across layers.
    allocation: Literal["uniform", "global"] = "uniform"


@dataclass
class LossWeights:
    contrastive: float = 1.0
    kd: float = 1.0
    kd_temperature: float = 1.0
    embed: float = 1.0
    hidden: float = 1.0


@dataclass
class DistillConfig:
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    grad_accum: int = 1
    losses: LossWeights = field(default_factory=LossWeights)
    local_loss: bool = False
    gather_with_grad: bool = False
    # Recompute block activations in backward: less memory for a larger batch.
    grad_checkpointing: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    # Stop after this many consecutive steps with a non-finite loss or gradient.
    max_nonfinite_steps: int = 20


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # Extra keys merged into the generated DeepSpeed config dict (e.g. offload settings).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Zero-shot evaluation set used during and after training (empty `data` disables it)."""

    data: str = ""
    classnames: str = "imagenet"
    templates: str = "openai"
    max_per_class: int | None = None
    batch_size: int = 256
    workers: int = 2


FINETUNE_STAGES = ("width", "depth", "width+depth")


@dataclass
class FinetuneConfig:
    """Fine-tuning-stage compression (mope_dist.finetune): a task teacher, then pruning stages in order."""

    # Each stage scores, prunes and distills the previous stage's student: "width" applies the
    # prune.*.heads/mlp targets, "depth" the prune.*.layers targets, "width+depth" all at once.
    stages: list[str] = field(default_factory=lambda: ["width", "depth"])
    # Contrastive fine-tuning steps of the full teacher on data.train_shards before compressing it
    # (0: teacher.name is already fine-tuned for the task).
    teacher_steps: int = 0
    # LR of that fine-tuning (null: distill.lr); a pre-trained CLIP wants a much smaller one.
    teacher_lr: float | None = None
    # Held-out retrieval pairs (image-text shards) for R@1/5/10 of the teacher and every student;
    # keep them apart from mope.proxy.data, which chose what to prune.
    eval_data: str = ""
    eval_batch_size: int = 256


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    # Reuse an output dir written with a different config (otherwise refused).
    overwrite: bool = False
    # Optional fsspec URL (s3://, gs://, ...) that checkpoints and logs are copied to in the background.
    sync_url: str | None = None


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mope: MopeConfig = field(default_factory=MopeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Collective timeout: a dead peer becomes an error after this long instead of a hang.
    dist_timeout_s: float = 600.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from untyped YAML, with a source for every key.


def _check_value(value: Any, tp: Any, key: str, source: str | dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} in {_source_of(source, key)}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{key} in {_source_of(source, key)}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} in {_source_of(source, key)}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {_source_of(source, key)}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key} in {_source_of(source, key)}: expected {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: Any, prefix: str, source: str | dict[str, str]):
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix or 'config'} in {_source_of(source, prefix)}: expected a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key {full} in {_source_of(source, full)} (known keys here: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _check_value(data[f.name], hints[f.name], full, source)
    return cls(**kwargs)


def _source_of(source: str | dict[str, str], key: str) -> str:
    """Where `key` (or the nearest section above it) was set: an override wins over the file."""
    if isinstance(source, str):
        return source
    for set_key, where in source.items():
        if set_key.startswith(f"{key}."):
            return where
    while key:
        if key in source:
            return source[key]
        key = key.rsplit("[", 1)[0] if key.endswith("]") else key.rpartition(".")[0]
    return source.get("", "defaults")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} on the command line: expected section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe, apply `a.b=c` overrides, validate; raise ConfigError naming key and source."""
    data: dict = {}
    file_source = str(path) if path else "defaults"
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    sources: dict[str, str] = {"": file_source}
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r} on the command line: {k} is not a section")
        node[keys[-1]] = value
        sources[".".join(keys)] = "the command line"
    cfg = _build(Config, data, "", sources)
    _validate(cfg, sources)
    return cfg


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    def fail(key: str, message: str):
        raise ConfigError(f"{key} in {_source_of(sources, key)}: {message}")

    for key in ("data.train_shards", "mope.proxy.data", "eval.data"):
        value = _get(cfg, key)
        if (
            value
            and _is_local_path(value)
            and not value.startswith("local-dir:")
            and not Path(value).exists()
        ):
            fail(key, f"path {value} does not exist")
    teacher = cfg.teacher.name
    if teacher.startswith("local-dir:") and not Path(teacher[len("local-dir:") :]).is_dir():
        fail("teacher.name", f"directory {teacher[len('local-dir:') :]} does not exist")
    if "/" in teacher and not teacher.startswith(("local-dir:", "hf-hub:")) and not Path(teacher).is_dir():
        import open_clip  # only here: a name with a slash is either a model dir or an open_clip name

        if teacher.replace("/", "-") not in open_clip.list_models():
            fail("teacher.name", f"{teacher} is neither a model directory nor an open_clip model name")
    pretrained = cfg.teacher.pretrained
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            fail("teacher.pretrained", f"weights file {pretrained} does not exist")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "distill.steps": cfg.distill.steps,
        "distill.grad_accum": cfg.distill.grad_accum,
        "distill.log_every": cfg.distill.log_every,
        "distill.ckpt_every": cfg.distill.ckpt_every,
        "distill.keep_checkpoints": cfg.distill.keep_checkpoints,
        "distill.max_nonfinite_steps": cfg.distill.max_nonfinite_steps,
        "mope.neuron_groups": cfg.mope.neuron_groups,
        "mope.candidates_per_forward": cfg.mope.candidates_per_forward,
        "mope.rounds": cfg.mope.rounds,
        "mope.proxy.batch_size": cfg.mope.proxy.batch_size,
        "eval.batch_size": cfg.eval.batch_size,
        "finetune.eval_batch_size": cfg.finetune.eval_batch_size,
        "dist_timeout_s": cfg.dist_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            fail(key, f"must be positive, got {value}")
    for key, value in {
        "data.workers": cfg.data.workers,
        "eval.workers": cfg.eval.workers,
        "distill.warmup_steps": cfg.distill.warmup_steps,
        "distill.eval_every": cfg.distill.eval_every,
        "finetune.teacher_steps": cfg.finetune.teacher_steps,
    }.items():
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if not 0 <= cfg.data.max_skip_rate <= 1:
        fail("data.max_skip_rate", f"must be in [0, 1], got {cfg.data.max_skip_rate}")
    if cfg.data.samples_per_epoch is not None and cfg.data.samples_per_epoch <= 0:
        fail("data.samples_per_epoch", f"must be positive, got {cfg.data.samples_per_epoch}")
    if cfg.data.batch_size % cfg.distill.grad_accum:
        fail(
            "data.batch_size",
            f"{cfg.data.batch_size} is not divisible by distill.grad_accum={cfg.distill.grad_accum}",
        )
    if not 0 <= cfg.distill.min_lr <= cfg.distill.lr:
        fail("distill.min_lr", f"must be in [0, distill.lr={cfg.distill.lr}], got {cfg.distill.min_lr}")
    if len(cfg.distill.betas) != 2 or not all(0 <= b < 1 for b in cfg.distill.betas):
        fail("distill.betas", f"must be two numbers in [0, 1), got {cfg.distill.betas}")
    if cfg.distill.losses.kd_temperature <= 0:
        fail("distill.losses.kd_temperature", "must be positive")
    for name, value in dataclasses.asdict(cfg.distill.losses).items():
        if value < 0:
            fail(f"distill.losses.{name}", f"must be >= 0, got {value}")
    if cfg.finetune.teacher_lr is not None and cfg.finetune.teacher_lr <= 0:
        fail("finetune.teacher_lr", f"must be positive, got {cfg.finetune.teacher_lr}")
    if not cfg.finetune.stages:
        fail("finetune.stages", "needs at least one stage")
    for i, stage in enumerate(cfg.finetune.stages):
        if stage not in FINETUNE_STAGES:
            fail(f"finetune.stages[{i}]", f"must be one of {', '.join(FINETUNE_STAGES)}, got {stage!r}")
    for i, tower in enumerate(cfg.mope.towers):
        if tower not in ("vision", "text"):
            fail(f"mope.towers[{i}]", f"must be 'vision' or 'text', got {tower!r}")
    for i, kind in enumerate(cfg.mope.kinds):
        if kind not in ("head", "neurons", "layer"):
            fail(f"mope.kinds[{i}]", f"must be 'head', 'neurons' or 'layer', got {kind!r}")
    for tower in ("vision", "text"):
        for unit in ("layers", "heads", "mlp"):
            key = f"prune.{tower}.{unit}"
            value = _get(cfg, key)
            if value is None:
                continue
            if isinstance(value, float) and not 0 < value <= 1:
                fail(key, f"a keep-ratio must be in (0, 1], got {value}")
            if isinstance(value, int) and value < 1:
                fail(key, f"must keep at least 1, got {value}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate_targets(cfg: Config, layers: dict[str, int], heads: dict[str, int], mlp: dict[str, int]) -> None:
    """Check absolute prune targets against the teacher's size (layers/heads/mlp per tower)."""
    limits = {"layers": layers, "heads": heads, "mlp": mlp}
    for tower in ("vision", "text"):
        for unit, limit in limits.items():
            key = f"prune.{tower}.{unit}"
            value = _get(cfg, key)
            if isinstance(value, int) and value > limit[tower]:
                raise ConfigError(f"{key}: target {value} is larger than the teacher's {limit[tower]}")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, cfg.to_yaml())


def config_from_argv(argv: list[str]) -> Config:
    """`CONFIG.yaml [section.key=value ...]` -> Config; bad input prints one line and exits 2."""
    if not argv or "=" in argv[0]:
        print("usage: CONFIG.yaml [section.key=value ...]", file=sys.stderr)
        raise SystemExit(2)
    try:
        return load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if (
    __name__ == "__main__"
):  # `python -m mope_dist.config CONFIG [overrides]`: validate only (the launchers do)
    config_from_argv(sys.argv[1:])
