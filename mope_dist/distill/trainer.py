"""The training loop: DeepSpeed engine on the student, frozen teacher beside it, one loop top to bottom.

    result = train(student, teacher, loader, TrainArgs(...), output_dir, dist_info, evaluate=None)
    export_student(result.engine, output_dir / "final", provenance={...})

- Student: a PrunableCLIP wrapped by `deepspeed.initialize` (ZeRO 0-3, fp32/bf16/fp16, gradient
  accumulation and clipping from the DS config dict). torch AdamW, no weight decay on norms, biases,
  embeddings and logit_scale. LR: warmup + cosine, a pure function of the optimizer step.
- Teacher (optional): outside the engine, frozen, eval mode; bf16 on GPU, fp32 on CPU. Without a
  teacher (or with only the contrastive weight) this is plain CLIP pre-training.
- Loader protocol (mope_dist.data.ImageTextLoader): `len(loader)` batches per epoch on every rank,
  `loader.set_epoch(epoch, start_step)` then `iter(loader)` yields the epoch's remaining
  (images, tokens) batches; optional `loader.skipped() -> {reason: count}` (summed over ranks into
  data/skipped/<reason>; each rank also logs its own counts when they grow) and
  `loader.sample_counts() -> {"used", "skipped"}`: when the skipped fraction of all samples read (all
  ranks, since start) passes `max_skip_rate` at a log step, training stops with a JobError.
- Non-finite loss or gradients (any rank): the optimizer step is skipped (a non-finite loss makes
  non-finite gradients; DeepSpeed's overflow check catches them under ZeRO 1-3, bf16 and fp16, our own
  gradient-norm check under ZeRO-0 fp32), so the loop never waits on the GPU for a per-batch loss
  check. Skips are counted; after `max_consecutive_skips` in a row training stops with an error and
  the last checkpoint intact.
- Resume: the newest complete checkpoint restores module, optimizer, step and data position
  (epoch, batches consumed in it), so the LR continues and the data stream does not replay.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist

from mope_dist import dist
from mope_dist.distill.checkpoint import CheckpointManager, Mirror, step_tag
from mope_dist.distill.losses import CLIPOutputs, DistillLoss, layer_map
from mope_dist.distill.metrics import MetricsLog, format_line
from mope_dist.distill.optim import build_ds_config, lr_at, make_optimizer, set_lr
from mope_dist.distill.preempt import Preemption
from mope_dist.errors import JobError
from mope_dist.model.runtime import eval_mode
from mope_dist.utils import get_logger

log = get_logger("mope_dist.distill")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainArgs:
    total_steps: int  # optimizer steps
    micro_batch_size: int  # per rank; must equal the loader's batch size
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # 0 disables
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    ds_config_extra: dict | None = None  # merged into the generated DeepSpeed config
    grad_checkpointing: bool = False
    # losses (see mope_dist.distill.losses)
    contrastive_weight: float = 1.0
    kd_weight: float = 0.0
    embed_weight: float = 0.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    local_loss: bool = False
    gather_with_grad: bool = False
    # bookkeeping
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (if `evaluate` is given)
    save_every: int = 0  # 0: save only at the end
    keep_checkpoints: int = 2
    max_consecutive_skips: int = 10
    max_skip_rate: float = 1.0  # stop when more than this fraction of the samples read was unusable
    mirror_url: str | None = None  # fsspec URL; checkpoints and logs are copied there in the background
    resume: bool = True
    preempt_grace_s: float = 25.0  # SIGTERM: checkpoint, then exit (distill/preempt.py); 0: exit now


@dataclass
class TrainState:
    """Everything the loop needs to continue, stored in each checkpoint's client_state."""

    step: int = 0  # optimizer steps applied
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed on each rank
    samples_seen: int = 0  # over all ranks, applied steps only
    skipped_steps: int = 0  # non-finite loss or gradients
    consecutive_skips: int = 0


@dataclass
class TrainResult:
    engine: object  # the DeepSpeed engine (engine.module is the student)
    state: TrainState
    eval: dict = field(default_factory=dict)  # last student evaluation


class HiddenRecorder:
    """Collects every block output of both towers during a forward, through forward hooks.

    Hooks (rather than a different forward) keep the DeepSpeed engine wrapping the plain model, so
    ZeRO-3's parameter hooks and the checkpoint's parameter names stay those of the model.
    """

    def __init__(self, model: torch.nn.Module):
        self.hidden: dict[str, list] = {"visual": [], "text": []}
        self.active = False
        self.handles = [
            block.register_forward_hook(functools.partial(self._record, tower))
            for tower in self.hidden
            for block in getattr(model, tower).blocks
        ]

    def close(self) -> None:
        """Remove the hooks and drop the last outputs (graph nodes that would keep the engine alive)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.hidden = [], {"visual": [], "text": []}

    def _record(self, tower, module, args, output):
        if self.active:  # not during gradient-checkpoint recomputation in backward
            self.hidden[tower].append(output)

    def __call__(self, forward, images, texts) -> CLIPOutputs:
        self.hidden, self.active = {"visual": [], "text": []}, True
        try:
            image, text, scale = forward(images, texts)[:3]
        finally:
            self.active = False
        return CLIPOutputs(image, text, scale, self.hidden["visual"], self.hidden["text"])


def _forward(model, recorder: HiddenRecorder | None, images, texts) -> CLIPOutputs:
    if recorder is not None:
        return recorder(model, images, texts)
    image, text, scale = model(images, texts)[:3]
    return CLIPOutputs(image, text, scale)


def make_loss(args: TrainArgs, student, teacher) -> DistillLoss:
    layers = {}
    if args.hidden_weight > 0 and teacher is not None:
        layers = {
            f"{tower}_layers": layer_map(
                getattr(student.spec, spec).source_layers, getattr(teacher.spec, spec).source_layers
            )
            for tower, spec in (("image", "vision"), ("text", "text"))
        }
    return DistillLoss(
        contrastive=args.contrastive_weight,
        kd=args.kd_weight,
        embed=args.embed_weight,
        hidden=args.hidden_weight,
        temperature=args.temperature,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        **layers,
    )


def _ensure_process_group() -> None:
    """deepspeed.initialize needs a process group; a plain `python` run gets a 1-process one."""
    if tdist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_distributed(use_deepspeed=True)


def _promote_scalar_params(model: torch.nn.Module) -> None:
    """Reshape 0-dim parameters (logit_scale) to [1], in place.

    deepspeed 0.19 cannot take 0-dim parameters: its initial broadcast (all stages) and ZeRO-3's
    partitioning call `p.data.view(torch.uint8)`, which raises for scalars, and its ZeRO-0 gradient
    clipping fails on them. A 1-element logit scale broadcasts identically in the forward; checkpoints
    therefore hold logit_scale as [1], and `export_student` reshapes it back to the model's [].
    """
    for p in model.parameters():
        if p.ndim == 0:
            p.data = p.data.reshape(1)


def _gathered(engine):
    """Full student parameters on every rank for the duration (ZeRO-3 only; a no-op otherwise)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """{"imagenet": {"top1": 0.5}, "n": 3, "note": "x"} -> {"imagenet/top1": 0.5, "n": 3.0} (numbers only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _evaluate(evaluate, model, gathered=None) -> dict:
    with eval_mode(model), gathered or contextlib.nullcontext(), torch.no_grad():
        return _flat_numbers(evaluate(model))


def _reduce_sum(values: dict, device: torch.device) -> dict[str, float]:
    """Sum over ranks of per-rank numbers or scalar tensors with identical keys (one all-reduce)."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    return dict(zip(keys, dist.all_reduce_sum(t).tolist(), strict=True))


def _window_metrics(
    sums: dict, window: dict, elapsed: float, global_batch: int, world: int, loader, device
) -> dict:
    """Loss terms and data wait averaged over ranks, throughput, and the loader's skip counters summed
    over ranks, for one log window. Collective."""
    local = {f"loss/{k}": v / max(1, window["micro"]) for k, v in sums.items()}
    local["perf/data_wait_s"] = window["data_wait"] / window["steps"]
    m = {k: v / world for k, v in _reduce_sum(local, device).items()}
    skipped = loader.skipped() if hasattr(loader, "skipped") else {}
    if skipped:
        if skipped != window.get("skipped_logged", {}) and any(skipped.values()):
            nonzero = {k: v for k, v in skipped.items() if v}
            log.warning(f"data: skipped on this rank so far: {nonzero}")  # per rank (tagged lines)
        window["skipped_logged"] = skipped
        counts = _reduce_sum({f"data/skipped/{k}": v for k, v in skipped.items()}, device)
        m.update(counts)
        m["data/skipped_samples"] = sum(counts.values())
    if hasattr(loader, "sample_counts"):
        c = loader.sample_counts()
        totals = _reduce_sum({"used": c["used"], "skipped": c["skipped"]}, device)
        m["data/used_samples"], m["data/unusable_samples"] = totals["used"], totals["skipped"]
    samples_per_s = window["steps"] * global_batch / elapsed
    m["perf/samples_per_s"] = samples_per_s
    m["perf/samples_per_s_per_device"] = samples_per_s / world
    m["perf/step_time_s"] = elapsed / window["steps"]
    return m


def train(
    student,
    teacher,
    loader,
    args: TrainArgs,
    output_dir: str | os.PathLike,
    dist_info: dist.DistInfo,
    evaluate=None,
) -> TrainResult:
    """Train `student` (in place) for `args.total_steps` optimizer steps; collective on every rank.

    `evaluate(model) -> dict` (optional, called on every rank, e.g. distributed zero-shot) runs every
    `args.eval_every` steps and at the end; numeric results are logged as eval/<key>, the teacher's
    once as eval_teacher/<key>.
    """
    import deepspeed

    out = Path(output_dir)
    device, world, main = dist_info.device, dist_info.world_size, dist_info.is_main
    if getattr(student, "logit_bias", None) is not None:
        raise ValueError("models with a logit bias (SigLIP) are not supported by the CLIP losses")
    loss_fn = make_loss(args, student, teacher)
    if loss_fn.needs_teacher and teacher is None:
        raise ValueError("kd/embed/hidden loss weights > 0 need a teacher")
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if teacher is not None:
        teacher = teacher.to(device=device, dtype=teacher_dtype).eval().requires_grad_(False)
    student.set_grad_checkpointing(args.grad_checkpointing)
    student_rec = HiddenRecorder(student) if loss_fn.needs_hidden else None
    teacher_rec = HiddenRecorder(teacher) if loss_fn.needs_hidden else None

    _ensure_process_group()
    # ZeRO-0 fp32 runs the plain torch optimizer, whose gradients DeepSpeed does not check for inf/NaN:
    # the loop clips and checks them itself
    own_clip = args.zero_stage == 0 and args.precision == "fp32"
    ds_config = build_ds_config(
        args.micro_batch_size,
        args.grad_accum_steps,
        args.zero_stage,
        args.precision,
        0.0 if own_clip else args.grad_clip,
        args.ds_config_extra,
    )
    optimizer = make_optimizer(student, args.lr, args.weight_decay, args.betas, args.eps)
    _promote_scalar_params(student)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    engine.train()
    dtype = DTYPES[args.precision]
    global_batch = args.micro_batch_size * args.grad_accum_steps * world

    mirror = Mirror(args.mirror_url, out) if args.mirror_url and main else None
    ckpt = CheckpointManager(out / "checkpoints", args.keep_checkpoints, mirror)
    state = TrainState()
    tag = dist.broadcast_object(ckpt.latest() if args.resume else None)
    if tag is not None:
        state = TrainState(**ckpt.load(engine, tag)["train_state"])
        log.info(
            f"resumed from {ckpt.dir / tag}: step {state.step}, epoch {state.epoch} batch {state.batch_in_epoch}"
        )
    metrics = MetricsLog(out, resume_step=state.step) if main else None
    last_eval: dict = {}
    preemption = Preemption(args.preempt_grace_s)  # collective; armed before the loader forks workers

    try:
        if evaluate is not None and teacher is not None and state.step == 0:
            scores = _evaluate(evaluate, teacher)
            if main:
                metrics.write(
                    0, {f"eval_teacher/{k}": v for k, v in scores.items()}, f"teacher eval: {scores}"
                )

        if state.batch_in_epoch >= len(loader):  # the checkpoint ended exactly at an epoch boundary
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        loader.set_epoch(state.epoch, state.batch_in_epoch)
        batches = iter(loader)
        sums: dict = {}  # loss terms summed over the log window's micro-batches
        window = {"micro": 0, "steps": 0, "data_wait": 0.0, "t0": time.perf_counter()}
        last_saved = state.step if tag is not None else -1
        dist.note_progress(step=state.step, checkpoint=str(ckpt.dir / tag) if tag else "none")

        while state.step < args.total_steps:
            set_lr(
                engine.optimizer, lr_at(state.step, args.lr, args.warmup_steps, args.total_steps, args.min_lr)
            )
            micro, own_skip, grad_norm, step_sums = 0, False, None, {}
            while micro < args.grad_accum_steps:
                t = time.perf_counter()
                batch = next(batches, None)
                if batch is None:  # epoch finished: the loader restarts at the next one
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    loader.set_epoch(state.epoch, 0)
                    batches = iter(loader)
                    continue
                window["data_wait"] += time.perf_counter() - t
                state.batch_in_epoch += 1
                images, texts = batch
                if images.shape[0] != args.micro_batch_size:
                    raise ValueError(
                        f"loader batch of {images.shape[0]} but micro_batch_size={args.micro_batch_size}: "
                        "every rank must get full, equal batches (the DeepSpeed config assumes them)"
                    )
                texts = texts.to(device, non_blocking=True)

                teacher_out = None
                if loss_fn.needs_teacher:
                    with torch.no_grad():
                        teacher_out = _forward(teacher, teacher_rec, images.to(device, teacher_dtype), texts)
                student_out = _forward(
                    engine, student_rec, images.to(device, dtype, non_blocking=True), texts
                )
                loss, terms = loss_fn(student_out, teacher_out)
                engine.backward(loss)  # a non-finite loss makes non-finite gradients: caught below
                micro += 1
                if micro == args.grad_accum_steps and own_clip:  # grads are all-reduced by now
                    params = engine.module.parameters()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
                    if not torch.isfinite(grad_norm):  # params without a grad are left alone by AdamW
                        engine.optimizer.zero_grad(set_to_none=True)
                        own_skip = True
                engine.step()
                for k, v in {**terms, "total": loss.detach()}.items():  # device tensors: no host sync
                    step_sums[k] = step_sums.get(k, 0.0) + v.float()

            if own_skip or not engine.was_step_applied():  # the same decision on every rank
                state.skipped_steps += 1
                state.consecutive_skips += 1
                if main:
                    log.warning(
                        f"step {state.step + 1}: non-finite loss or gradients; optimizer step skipped"
                    )
                _check_skips(state, args, ckpt)
                continue
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            window["micro"] += args.grad_accum_steps
            state.step += 1
            state.consecutive_skips = 0
            state.samples_seen += global_batch
            window["steps"] += 1
            dist.note_progress(step=state.step)

            if state.step % args.log_every == 0 or state.step == args.total_steps:
                elapsed = time.perf_counter() - window["t0"]
                m = _window_metrics(sums, window, elapsed, global_batch, world, loader, device)
                grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
                m.update(
                    {
                        "train/lr": engine.optimizer.param_groups[0]["lr"],
                        "train/logit_scale": student_out.logit_scale.detach().float().item(),
                        "train/epoch": state.epoch,
                        "train/samples_seen": state.samples_seen,
                        "train/skipped_steps": state.skipped_steps,
                        **({"train/grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                    }
                )
                if main:
                    metrics.write(state.step, m, format_line(state.step, args.total_steps, m))
                _check_skip_rate(m, args, ckpt)  # the same summed counts on every rank
                sums = {}
                window = {
                    "micro": 0,
                    "steps": 0,
                    "data_wait": 0.0,
                    "t0": time.perf_counter(),
                    "skipped_logged": window.get("skipped_logged", {}),
                }

            if evaluate is not None and (
                (args.eval_every and state.step % args.eval_every == 0) or state.step == args.total_steps
            ):
                last_eval = _evaluate(evaluate, engine.module, _gathered(engine))
                if main:
                    metrics.write(
                        state.step, {f"eval/{k}": v for k, v in last_eval.items()}, f"eval: {last_eval}"
                    )
                window["t0"] = time.perf_counter()  # evaluation time is not training throughput

            if (args.save_every and state.step % args.save_every == 0) or state.step == args.total_steps:
                if state.step != last_saved:
                    ckpt.save(engine, state.step, {"train_state": asdict(state)})
                    last_saved = state.step
                    dist.note_progress(checkpoint=str(ckpt.dir / step_tag(state.step)))
                    if mirror is not None:
                        mirror.sync(["metrics.jsonl", "tensorboard"])
                window["t0"] = time.perf_counter()

            if preemption.stop_requested():  # collective, every step: SIGTERM on any rank
                if state.step != last_saved:
                    ckpt.save(engine, state.step, {"train_state": asdict(state)})
                raise preemption.stopped(ckpt.dir / step_tag(state.step))
    finally:
        preemption.close()
        for recorder in (student_rec, teacher_rec):
            if recorder is not None:
                recorder.close()
        if metrics is not None:
            metrics.close()
        if mirror is not None:
            mirror.sync(["metrics.jsonl", "tensorboard"])
            mirror.close()
    return TrainResult(engine, state, last_eval)


def _check_skip_rate(m: dict, args: TrainArgs, ckpt: CheckpointManager) -> None:
    used, bad = m.get("data/used_samples", 0), m.get("data/unusable_samples", 0)
    if used + bad == 0 or bad / (used + bad) <= args.max_skip_rate:
        return
    reasons = {k.rsplit("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("data/skipped/") and v}
    raise JobError(
        f"{bad:.0f} of the {used + bad:.0f} samples read so far were unusable ({bad / (used + bad):.1%}, "
        f"more than data.max_skip_rate={args.max_skip_rate:g}; skipped by reason: {reasons}): stopping. "
        f"The last checkpoint ({ckpt.latest() or 'none'} in {ckpt.dir}) is intact; check the shards or "
        "raise data.max_skip_rate, then rerun."
    )


def _check_skips(state: TrainState, args: TrainArgs, ckpt: CheckpointManager) -> None:
    if state.consecutive_skips >= args.max_consecutive_skips:
        raise JobError(
            f"{state.consecutive_skips} consecutive non-finite losses/gradients after step {state.step}: stopping. "
            f"The last good checkpoint ({ckpt.latest() or 'none'} in {ckpt.dir}) is intact; lower the LR, "
            "enable gradient clipping or check the data, then resume."
        )


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 student weights on every rank (the optimizer's master copy where there is one). Collective.

    Shapes are the engine's (logit_scale [1], see `_promote_scalar_params`)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # ZeRO 1-3 / bf16: master weights (gathered under ZeRO-3)
        if full is None:  # ZeRO-0 fp32/fp16: the module weights are the weights
            full = p.detach()
        state[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        state[name] = b.detach().cpu().clone()
    return state


def export_student(engine, path: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Save the trained student as a standalone model dir (mope_dist.model.save_pretrained). Collective."""
    from mope_dist.model.clip import build_on_meta
    from mope_dist.model.io import save_pretrained

    state = full_state_dict(engine)
    if dist.is_main():
        model = build_on_meta(engine.module.spec)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()}, strict=True, assign=True)
        save_pretrained(model, path, provenance=provenance)
    dist.barrier()
    return Path(path)
