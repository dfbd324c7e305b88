"""Typed run configuration: YAML file + `section.key=value` overrides, validated before any work.

Every error names the offending key and where it came from (the YAML file or the command line) in
one line; entry points turn `ConfigError` into exit status 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mope_dist.errors import ConfigError
from mope_dist.mope.methods import METHODS
from mope_dist.typed_yaml import build, parse_override, source_of
from mope_dist.utils import atomic_write_text, is_local_path


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
    # uint8: workers hand over raw pixels (4x less shared memory and copy than float32) and the
    # trainer normalises on the device (mope_dist.data.device); float32: open_clip's transform as is.
    image_dtype: Literal["uint8", "float32"] = "uint8"
    # workers: decode and crop each image in the loader workers (CPU). device: the workers read JPEG
    # headers and draw the crops only; the trainer decodes each batch on its device (nvJPEG on a GPU,
    # torchvision's batched decode_jpeg) and crops and resizes there; other formats stay on the CPU.
    # Needs image_dtype uint8 and open_clip's default train transform.
    decode: Literal["workers", "device"] = "workers"
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
    # A name in mope_dist.mope.methods.METHODS: mope, magnitude, random, taylor.
    method: str = "mope"
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
    # Kept MLP neurons per layer rounded to a multiple of this (e.g. 64: tensor-core friendly shapes);
    # heads need none (each is head_dim wide). 1 keeps the targets exactly.
    width_multiple: int = 1


@dataclass
class LossWeights:
    """Weights of the training loss terms (0 skips a term and the work it needs). kd, embed and hidden
    apply when there is a teacher (pretrain, finetune stages); training without one (train_clip,
    finetune's teacher phase) uses the contrastive term alone."""

    contrastive: float = 1.0
    # Cross-modal KD: KL between the student's and the teacher's image-text logits at kd_temperature.
    kd: float = 1.0
    kd_temperature: float = 1.0
    # MSE of the normalised embeddings (a mean over elements: useful weights are large, ~1e3).
    embed: float = 1.0
    # MSE of each kept block's output against the teacher block it was cut from.
    hidden: float = 1.0


@dataclass
class DistillConfig:
    """The training loop's settings (mope_dist.distill.train takes this section as it is)."""

    # Optimizer steps; each takes data.batch_size samples over grad_accum micro-steps.
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    # Linear warmup to lr, then cosine decay to min_lr at `steps`.
    warmup_steps: int = 100
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # Gradient-norm clipping; 0 disables.
    grad_clip: float = 1.0
    grad_accum: int = 1
    losses: LossWeights = field(default_factory=LossWeights)
    # open_clip's ClipLoss options: each rank's rows only / gradients through the feature all-gather.
    local_loss: bool = False
    gather_with_grad: bool = False
    # Recompute block activations in backward: less memory for a larger batch.
    grad_checkpointing: bool = False
    # torch.compile the student and the teacher; null: on with CUDA, off on CPU (where it does not pay).
    compile: bool | None = None
    log_every: int = 10
    # Checkpoint every this many steps, and at the end.
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    # Evaluate (eval.data) every this many steps; 0: only at the end.
    eval_every: int = 0
    # Stop after this many consecutive steps with a non-finite loss or gradient. Such a step leaves the
    # weights and optimizer state unchanged but counts: in `steps` and for the LR schedule.
    max_nonfinite_steps: int = 20
    # On SIGTERM (preemption) save a checkpoint and exit, giving up after this many seconds; keep it
    # below the scheduler's kill delay (SLURM KillWait, k8s terminationGracePeriodSeconds: 30 s by
    # default). 0: exit at once without a checkpoint.
    preempt_grace_s: float = 25.0
    # torch.profiler over steps profile_start+1 .. profile_start+profile_steps (0: off): top operators,
    # a per-step summary (wall, device busy, host ms) and a trace in <output>/profile/. Those steps run
    # slower than the rest (the device is synchronised around them, the profiler records).
    profile_steps: int = 0
    profile_start: int = 20


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    # The student's working precision. bf16/fp16: DeepSpeed's mixed-precision optimizers (bf16/fp16
    # weights, fp32 master copy in the optimizer). amp_bf16: fp32 weights, forward under DeepSpeed's
    # torch autocast to bf16 (as open_clip's --precision amp_bf16; ZeRO reduces the gradients of
    # Linear/Conv weights in bf16). The frozen teacher runs in bf16 on GPU, fp32 on CPU.
    precision: Literal["fp32", "bf16", "fp16", "amp_bf16"] = "bf16"
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
    """Fine-tuning-stage compression (mope_dist.recipes.finetune): a task teacher, then pruning stages in order."""

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
    # Optional fsspec URL (s3://, gs://, ...) that checkpoints, logs, scores, plan, pruned/ and final/
    # are copied to in the background, laid out as under `dir` (fine-tuning's teacher and stages each
    # in their sub-path); a checkpoint's marker goes last, a failed copy is retried at the next one.
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
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r} on the command line: {k} is not a section")
        node[keys[-1]] = value
        sources[".".join(keys)] = "the command line"
    cfg = build(Config, data, "", sources)
    _validate(cfg, sources)
    return cfg


def _validate(cfg: Config, sources: dict[str, str]) -> None:
    """Values the types cannot express, section by section; the first problem is a ConfigError."""

    def fail(key: str, message: str):
        raise ConfigError(f"{key} in {source_of(sources, key)}: {message}")

    _validate_paths(cfg, fail)
    _validate_teacher(cfg.teacher, fail)
    _validate_data(cfg, fail)
    _validate_distill(cfg, fail)
    _validate_mope(cfg, fail)
    _validate_deepspeed(cfg, fail)
    _validate_bounds(cfg, fail, positive=("eval.batch_size",), non_negative=("eval.workers",))
    _validate_finetune(cfg, fail)
    _validate_prune(cfg, fail)
    _validate_bounds(cfg, fail, positive=("dist_timeout_s",))


def _validate_bounds(cfg: Config, fail, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()):
    for key in positive:
        if (value := _get(cfg, key)) <= 0:
            fail(key, f"must be positive, got {value}")
    for key in non_negative:
        if (value := _get(cfg, key)) < 0:
            fail(key, f"must be >= 0, got {value}")


def _validate_paths(cfg: Config, fail) -> None:
    """Local data paths must exist; remote ones are checked when opened."""
    for key in ("data.train_shards", "mope.proxy.data", "eval.data"):
        value = _get(cfg, key)
        if value and is_local_path(value) and not value.startswith("local-dir:") and not Path(value).exists():
            fail(key, f"path {value} does not exist")


def _validate_teacher(teacher: TeacherConfig, fail) -> None:
    name = teacher.name
    if name.startswith("local-dir:") and not Path(name[len("local-dir:") :]).is_dir():
        fail("teacher.name", f"directory {name[len('local-dir:') :]} does not exist")
    if "/" in name and not name.startswith(("local-dir:", "hf-hub:")) and not Path(name).is_dir():
        import open_clip  # only here: a name with a slash is either a model dir or an open_clip name

        if name.replace("/", "-") not in open_clip.list_models():
            fail("teacher.name", f"{name} is neither a model directory nor an open_clip model name")
    pretrained = teacher.pretrained
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            fail("teacher.pretrained", f"weights file {pretrained} does not exist")


def _validate_data(cfg: Config, fail) -> None:
    data = cfg.data
    _validate_bounds(cfg, fail, positive=("data.batch_size",), non_negative=("data.workers",))
    if not 0 <= data.max_skip_rate <= 1:
        fail("data.max_skip_rate", f"must be in [0, 1], got {data.max_skip_rate}")
    if data.samples_per_epoch is not None and data.samples_per_epoch <= 0:
        fail("data.samples_per_epoch", f"must be positive, got {data.samples_per_epoch}")
    if data.decode == "device" and data.image_dtype != "uint8":
        fail("data.decode", "device decoding hands uint8 images to the device: needs data.image_dtype=uint8")


def _validate_distill(cfg: Config, fail) -> None:
    d = cfg.distill
    positive = ("steps", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints", "max_nonfinite_steps")
    _validate_bounds(
        cfg,
        fail,
        positive=tuple(f"distill.{k}" for k in positive),
        non_negative=tuple(
            f"distill.{k}"
            for k in ("warmup_steps", "eval_every", "preempt_grace_s", "profile_steps", "profile_start")
        ),
    )
    if d.profile_steps and d.profile_start + d.profile_steps > d.steps:
        fail(
            "distill.profile_steps",
            f"steps {d.profile_start + 1}-{d.profile_start + d.profile_steps} are not all in a run of "
            f"distill.steps={d.steps}: lower distill.profile_start",
        )
    if cfg.data.batch_size % d.grad_accum:
        fail(
            "data.batch_size", f"{cfg.data.batch_size} is not divisible by distill.grad_accum={d.grad_accum}"
        )
    if not 0 <= d.min_lr <= d.lr:
        fail("distill.min_lr", f"must be in [0, distill.lr={d.lr}], got {d.min_lr}")
    if len(d.betas) != 2 or not all(0 <= b < 1 for b in d.betas):
        fail("distill.betas", f"must be two numbers in [0, 1), got {d.betas}")
    if d.losses.kd_temperature <= 0:
        fail("distill.losses.kd_temperature", "must be positive")
    for name, value in dataclasses.asdict(d.losses).items():
        if value < 0:
            fail(f"distill.losses.{name}", f"must be >= 0, got {value}")


# DeepSpeed config keys the generated config owns, by the key that sets them (deepspeed.extra may
# tune anything else, e.g. offload or the fp16 loss scaler, but not these)
DS_KEYS_OWNED = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "distill.grad_accum",
    "gradient_clipping": "distill.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
    "torch_autocast": "deepspeed.precision",
    "optimizer": "distill's AdamW settings",
    "scheduler": "distill's LR schedule",
}


def _validate_deepspeed(cfg: Config, fail) -> None:
    """The trainer relies on what it generated (e.g. under ZeRO-0 with fp32 weights it clips and skips
    non-finite steps itself, which an autocast scaler or DeepSpeed's clipping would undo)."""
    extra = cfg.deepspeed.extra
    for key, owner in DS_KEYS_OWNED.items():
        section, _, sub = key.partition(".")
        if section in extra and (not sub or (isinstance(extra[section], dict) and sub in extra[section])):
            fail(f"deepspeed.extra.{key}", f"is set by {owner}; set that instead")


def _validate_mope(cfg: Config, fail) -> None:
    m = cfg.mope
    if m.method not in METHODS:
        fail("mope.method", f"must be one of {', '.join(repr(name) for name in METHODS)}, got {m.method!r}")
    _validate_bounds(
        cfg,
        fail,
        positive=(
            "mope.neuron_groups",
            "mope.candidates_per_forward",
            "mope.rounds",
            "mope.proxy.batch_size",
        ),
    )
    for i, tower in enumerate(m.towers):
        if tower not in ("vision", "text"):
            fail(f"mope.towers[{i}]", f"must be 'vision' or 'text', got {tower!r}")
    for i, kind in enumerate(m.kinds):
        if kind not in ("head", "neurons", "layer"):
            fail(f"mope.kinds[{i}]", f"must be 'head', 'neurons' or 'layer', got {kind!r}")


def _validate_finetune(cfg: Config, fail) -> None:
    f = cfg.finetune
    _validate_bounds(
        cfg, fail, positive=("finetune.eval_batch_size",), non_negative=("finetune.teacher_steps",)
    )
    if f.teacher_lr is not None and f.teacher_lr <= 0:
        fail("finetune.teacher_lr", f"must be positive, got {f.teacher_lr}")
    if not f.stages:
        fail("finetune.stages", "needs at least one stage")
    for i, stage in enumerate(f.stages):
        if stage not in FINETUNE_STAGES:
            fail(f"finetune.stages[{i}]", f"must be one of {', '.join(FINETUNE_STAGES)}, got {stage!r}")


def _validate_prune(cfg: Config, fail) -> None:
    _validate_bounds(cfg, fail, positive=("prune.width_multiple",))
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
