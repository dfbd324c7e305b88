"""The training loop: DeepSpeed engine on the student, frozen teacher beside it, one loop top to bottom.

    result = train(student, teacher, loader, cfg.distill, cfg.deepspeed, micro_batch_size=...,
                   output_dir=..., dist_info=..., max_skip_rate=cfg.data.max_skip_rate,
                   mirror_url=cfg.output.sync_url, evaluate=None)
    export_student(result.engine, output_dir / "final", provenance={...})

- Settings: the config's `distill` and `deepspeed` sections as they are (mope_dist.config holds the
  one default of each); what the caller decides per call (micro batch, output dir, evaluator) are
  plain arguments.
- Student: a PrunableCLIP wrapped by `deepspeed.initialize` (ZeRO 0-3, fp32/bf16/fp16, gradient
  accumulation and clipping from the DS config dict). torch AdamW, no weight decay on norms, biases,
  embeddings and logit_scale. LR: warmup + cosine, a pure function of the optimizer step.
- Teacher (optional): outside the engine, frozen, eval mode; bf16 on GPU, fp32 on CPU. Without a
  teacher only the contrastive loss is trained (plain CLIP pre-training or fine-tuning).
- Loader protocol (mope_dist.data.ImageTextLoader): `len(loader)` batches per epoch on every rank,
  `loader.set_epoch(epoch, start_step)` then `iter(loader)` yields the epoch's remaining
  (images, tokens) batches; optional `loader.skipped() -> {reason: count}` (summed over ranks into
  data/skipped/<reason>; each rank also logs its own counts when they grow) and
  `loader.sample_counts() -> {"used", "skipped"}`: when the skipped fraction of all samples read (all
  ranks, since start) passes `max_skip_rate` at a log step, training stops with a JobError;
  optional `loader.state_dict()` / `load_state_dict(every rank's)`: the exact data position, gathered
  into each checkpoint and restored (remapped by the loader on another number of ranks or workers).
- Non-finite loss or gradients (any rank): the step leaves weights and optimizer state unchanged (a
  non-finite loss makes non-finite gradients; DeepSpeed's overflow check catches them under ZeRO 1-3,
  bf16 and fp16; under ZeRO-0 with fp32 weights our gradient-norm check, a device flag the fused AdamW
  obeys, so that no step waits for the device). It is still a step: the LR schedule and the data move
  on. Skips are read lazily (`SkippedSteps`), counted, and after `max_nonfinite_steps` in a row
  training stops with an error and the last checkpoint intact.
- Resume: the newest complete checkpoint restores module, optimizer, step and data position
  (epoch, batches consumed in it), so the LR continues and the data stream does not replay.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mope_dist import dist
from mope_dist.config import DeepSpeedConfig, DistillConfig
from mope_dist.data.device import DevicePrefetcher
from mope_dist.distill.checkpoint import CheckpointManager, Mirror, step_tag
from mope_dist.distill.engine import build_engine, gathered, own_clipping
from mope_dist.distill.losses import DistillLoss, HiddenRecorder, clip_outputs, make_loss
from mope_dist.distill.metrics import MetricsLog, MetricWindow, flat_numbers, format_line
from mope_dist.distill.optim import lr_at, set_lr
from mope_dist.distill.preempt import Preemption
from mope_dist.distill.profile import StepProfiler
from mope_dist.errors import JobError
from mope_dist.model.runtime import eval_mode
from mope_dist.utils import get_logger

log = get_logger("mope_dist.distill")

# the student's weights and inputs per deepspeed.precision (amp_bf16: fp32, autocast inside the engine)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": torch.float32}


@dataclass
class TrainState:
    """Everything the loop needs to continue, stored in each checkpoint's client_state."""

    step: int = 0  # optimizer steps taken, skipped ones included
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed on each rank
    samples_seen: int = 0  # over all ranks, applied steps only
    skipped_steps: int = 0  # non-finite loss or gradients: weights and optimizer state left unchanged
    consecutive_skips: int = 0
    # every rank's loader position (`loader.state_dict()`), gathered at each save: exact resume, also
    # on another number of ranks or workers (the loader remaps it). None for loaders without one.
    data: list[dict] | None = None


@dataclass
class TrainResult:
    engine: object  # the DeepSpeed engine (engine.module is the student)
    state: TrainState
    eval: dict = field(default_factory=dict)  # last student evaluation


def train(
    student,
    teacher,
    loader,
    cfg: DistillConfig,
    ds: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    output_dir: str | os.PathLike,
    dist_info: dist.DistInfo,
    max_skip_rate: float,
    mirror_url: str | None = None,
    evaluate=None,
    normalize=None,
) -> TrainResult:
    """Train `student` (in place) for `cfg.steps` optimizer steps; collective on every rank.

    `micro_batch_size`: per rank, equal to the loader's batch. `max_skip_rate`: data.max_skip_rate.
    `mirror_url`: fsspec URL (output.sync_url) that checkpoints and logs are copied to in the background.
    `evaluate(model) -> dict` (optional, called on every rank, e.g. distributed zero-shot) runs every
    `cfg.eval_every` steps and at the end; numeric results are logged as eval/<key>, the teacher's
    once as eval_teacher/<key>.
    `normalize` (mope_dist.data.device.ImageNormalizer): the loader yields uint8 images, normalised on
    the device after a copy that overlaps the previous step (DevicePrefetcher).
    """
    out, main = Path(output_dir), dist_info.is_main
    run = _setup(student, teacher, loader, cfg, ds, micro_batch_size, dist_info)
    mirror = Mirror(mirror_url, out) if mirror_url and main else None
    run.ckpt = CheckpointManager(out / "checkpoints", cfg.keep_checkpoints, mirror)
    state = _resume(run)
    run.metrics = MetricsLog(out, resume_step=state.step) if main else None
    window, last_eval = MetricWindow(), {}
    skips = SkippedSteps(run, state)
    preemption = Preemption(cfg.preempt_grace_s)  # collective; armed before the loader forks workers
    profiler = StepProfiler(cfg.profile_start, cfg.profile_steps, run.device, out / "profile", dist_info.rank)
    if cfg.profile_steps and state.step > cfg.profile_start and main:
        log.warning(
            f"distill.profile_steps: this run resumed at step {state.step}, past distill.profile_start="
            f"{cfg.profile_start}: nothing is profiled"
        )
    try:
        if evaluate is not None and run.teacher is not None and state.step == 0:
            with window.paused(run.device):
                _evaluate(run, evaluate, run.teacher, 0, "eval_teacher", "teacher eval")
        stream = LoaderStream(loader, state)
        batches = iter(DevicePrefetcher(stream, run.device, normalize, run.input_dtype))
        while state.step < cfg.steps:
            if profiler.opens_at(state.step):
                with window.paused(run.device):
                    profiler.open()
            set_lr(run.engine.optimizer, lr_at(state.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr))
            step = _step(run, batches, state, window)
            state.step += 1
            skips.add(state.step, step.skipped)
            window.add_step(step.sums, cfg.grad_accum, step.skipped)
            dist.note_progress(step=state.step)
            if profiler.closes_at(state.step):  # before this step's logging, evaluation and checkpoint
                with window.paused(run.device):
                    _report_profile(profiler.close_window(), out / "profile", main)
            last = state.step == cfg.steps
            if _due(state.step, cfg.log_every) or last:
                skips.settle()
                _log(run, state, window, step, max_skip_rate)
            if evaluate is not None and (_due(state.step, cfg.eval_every) or last):
                with window.paused(run.device):
                    last_eval = _evaluate(run, evaluate, run.engine.module, state.step, "eval", "eval")
            saved = _due(state.step, cfg.ckpt_every) or last
            if saved:
                with window.paused(run.device):
                    _save(run, state, skips)
            if preemption.stop_requested():  # collective: SIGTERM on any rank, agreed one step later
                if not saved:
                    _save(run, state, skips)
                raise preemption.stopped(run.ckpt.dir / step_tag(state.step))
        preemption.settle()  # collective: no flag all-reduce left in flight when training returns
    finally:
        profiler.close()
        preemption.close()
        run.close()
        if mirror is not None:
            mirror.sync(["metrics.jsonl", "tensorboard"])
            mirror.close()
    return TrainResult(run.engine, state, last_eval)


def _report_profile(summary: dict, where: Path, main: bool) -> None:
    if main:
        log.info(
            f"profile of {summary['steps']} steps: {summary['wall_ms']:.1f} ms/step, device busy "
            f"{summary['device_busy_ms']:.1f} ms, host operators {summary['host_ops_ms']:.1f} ms; "
            f"top operators and trace in {where}"
        )


def _due(step: int, every: int) -> bool:
    """Every `every` steps; 0 never (the end of training is handled by the caller)."""
    return bool(every) and step % every == 0


# ----------------------------------------------------------------------------------------------------
# setup


@dataclass
class _Run:
    """What the loop's helpers share: built once by `_setup` (checkpoints and log added by `train`)."""

    cfg: DistillConfig
    engine: object
    loss_fn: DistillLoss
    teacher: torch.nn.Module | None
    recorders: tuple  # (student's, teacher's) HiddenRecorder, or (None, None) without a hidden loss
    loader: object
    device: torch.device
    dtype: torch.dtype  # the student's inputs
    teacher_dtype: torch.dtype
    world: int
    micro_batch_size: int
    global_batch: int  # samples per optimizer step over all ranks
    own_clip: bool  # ZeRO-0 with fp32 weights: the loop clips and checks gradients itself
    ckpt: CheckpointManager | None = None
    metrics: MetricsLog | None = None  # rank 0 only
    data_position: dict | None = None  # this rank's loader position after the last consumed batch

    @property
    def input_dtype(self) -> torch.dtype:
        """What the prefetcher normalises images to: the models' dtype when they share one."""
        return self.dtype if self.dtype == self.teacher_dtype else torch.float32

    def close(self) -> None:
        for recorder in self.recorders:
            if recorder is not None:
                recorder.close()
        if self.metrics is not None:
            self.metrics.close()


def _setup(student, teacher, loader, cfg, ds, micro_batch_size, dist_info) -> _Run:
    """Loss, frozen teacher on the device, hidden-state hooks, then the student's DeepSpeed engine."""
    if getattr(student, "logit_bias", None) is not None:
        raise ValueError("models with a logit bias (SigLIP) are not supported by the CLIP losses")
    device = dist_info.device
    loss_fn = make_loss(cfg, student, teacher)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if teacher is not None:
        teacher = teacher.to(device=device, dtype=teacher_dtype).eval().requires_grad_(False)
    student.set_grad_checkpointing(cfg.grad_checkpointing)
    recorders = (HiddenRecorder(student), HiddenRecorder(teacher)) if loss_fn.needs_hidden else (None, None)
    engine = build_engine(student.to(device), cfg, ds, micro_batch_size)
    if cfg.compile if cfg.compile is not None else device.type == "cuda":
        engine.compile()  # in place: parameter names, hooks and checkpoints unchanged
        if teacher is not None:
            teacher.compile()
    return _Run(
        cfg=cfg,
        engine=engine,
        loss_fn=loss_fn,
        teacher=teacher,
        recorders=recorders,
        loader=loader,
        device=device,
        dtype=DTYPES[ds.precision],
        teacher_dtype=teacher_dtype,
        world=dist_info.world_size,
        micro_batch_size=micro_batch_size,
        global_batch=micro_batch_size * cfg.grad_accum * dist_info.world_size,
        own_clip=own_clipping(ds),
    )


def _resume(run: _Run) -> TrainState:
    """The state of the newest complete checkpoint (engine restored from it), or a fresh one. Collective."""
    tag = dist.broadcast_object(run.ckpt.latest())
    state = TrainState()
    if tag is not None:
        state = TrainState(**run.ckpt.load(run.engine, tag)["train_state"])
        log.info(
            f"resumed from {run.ckpt.dir / tag}: step {state.step}, epoch {state.epoch} batch {state.batch_in_epoch}"
        )
    dist.note_progress(step=state.step, checkpoint=str(run.ckpt.dir / tag) if tag else "none")
    return state


class LoaderStream:
    """The loader as one stream of batches from a data position on, across epochs. Each batch comes
    with the position after it (epoch, batch index, and the loader's own `state_dict()` where it has
    one), which the step that consumes it records: a stream that reads ahead (a device prefetcher)
    then does not move the checkpointed position."""

    def __init__(self, loader, state: TrainState):
        epoch, batch_in_epoch = state.epoch, state.batch_in_epoch
        self.loader, self.exact = loader, hasattr(loader, "state_dict")
        if self.exact and state.data:
            loader.load_state_dict(state.data)  # remapped there if the layout changed
            epoch = loader.epoch
        else:
            if batch_in_epoch >= len(loader):  # a checkpoint taken exactly at an epoch boundary
                epoch, batch_in_epoch = epoch + 1, 0
            loader.set_epoch(epoch, batch_in_epoch)
        self.epoch, self.index = epoch, batch_in_epoch
        self.batches = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, dict | None]]:
        batch = next(self.batches, None)
        while batch is None:  # epoch finished: the loader restarts at the next one
            self.epoch, self.index = self.epoch + 1, 0
            self.loader.set_epoch(self.epoch, 0)
            self.batches = iter(self.loader)
            batch = next(self.batches, None)
        self.index += 1
        images, texts = batch
        return images, texts, (self.epoch, self.index, self.loader.state_dict() if self.exact else None)


# ----------------------------------------------------------------------------------------------------
# one optimizer step


@dataclass
class _Step:
    # non-finite loss or gradients on some rank, the update left out: DeepSpeed's host decision, or
    # under own clipping a 0-dim device flag (1.0: skipped) that the fused AdamW obeyed
    skipped: bool | torch.Tensor
    sums: dict  # loss terms summed over the micro-batches (device tensors: no host sync)
    logit_scale: torch.Tensor  # the student's, last micro-batch
    grad_norm: torch.Tensor | None  # ours under ZeRO-0 fp32; otherwise DeepSpeed's (read when logged)


def _step(run: _Run, batches: Iterator, state: TrainState, window: MetricWindow) -> _Step:
    """`cfg.grad_accum` micro-batches: forward (teacher, student), loss, backward, `engine.step()`.
    Records the data position consumed in `state` (consumed by a skipped step too: no replay)."""
    engine, loss_fn, (student_rec, teacher_rec) = run.engine, run.loss_fn, run.recorders
    sums, grad_norm = {}, None
    for micro in range(1, run.cfg.grad_accum + 1):
        t = time.perf_counter()
        images, texts, (state.epoch, state.batch_in_epoch, run.data_position) = next(batches)
        window.data_wait += time.perf_counter() - t
        if images.shape[0] != run.micro_batch_size:
            raise ValueError(
                f"loader batch of {images.shape[0]} but micro_batch_size={run.micro_batch_size}: "
                "every rank must get full, equal batches (the DeepSpeed config assumes them)"
            )
        teacher_out = None
        if loss_fn.needs_teacher:
            with torch.no_grad():
                teacher_out = clip_outputs(run.teacher, teacher_rec, images.to(run.teacher_dtype), texts)
        student_out = clip_outputs(engine, student_rec, images.to(run.dtype), texts)
        loss, terms = loss_fn(student_out, teacher_out)
        engine.backward(loss)  # a non-finite loss makes non-finite gradients: caught below
        if micro == run.cfg.grad_accum and run.own_clip:  # grads are all-reduced by now
            grad_norm = torch.nn.utils.clip_grad_norm_(
                engine.module.parameters(), run.cfg.grad_clip or float("inf")
            )
            # the fused AdamW leaves weights, moments and its step count alone where this is set
            engine.optimizer.found_inf = torch.isfinite(grad_norm).logical_not().float()
        engine.step()
        for k, v in {**terms, "total": loss.detach()}.items():
            sums[k] = sums.get(k, 0.0) + v.float()
    skipped = engine.optimizer.found_inf if run.own_clip else not engine.was_step_applied()
    return _Step(skipped, sums, student_out.logit_scale, grad_norm)


class SkippedSteps:
    """Counts the skipped steps into the state and stops the run after `max_nonfinite_steps` in a row,
    reading the flags lazily: at each log step and checkpoint, and once more than that many wait (then
    all but the newest, whose step the device may still be running). So a step never waits for the
    device for its flag, and the count is exact wherever it is logged or saved."""

    def __init__(self, run: _Run, state: TrainState):
        self.run, self.state = run, state
        self.pending: list[tuple[int, bool | torch.Tensor]] = []  # (step, skipped)

    def add(self, step: int, skipped: bool | torch.Tensor) -> None:
        self.pending.append((step, skipped))
        if len(self.pending) > self.run.cfg.max_nonfinite_steps:
            self.settle(keep_newest=True)

    def settle(self, keep_newest: bool = False) -> None:
        """Read the pending flags (one host read for all device ones) and count them. The flags are the
        same on every rank, so every rank raises the same error at the same step."""
        n = len(self.pending) - int(keep_newest)
        done, self.pending = self.pending[:n], self.pending[n:]
        on_device = [f for _, f in done if isinstance(f, torch.Tensor)]
        read = iter(torch.stack(on_device).tolist() if on_device else ())
        state, cfg = self.state, self.run.cfg
        for step, flag in done:
            if not (next(read) if isinstance(flag, torch.Tensor) else flag):
                state.consecutive_skips = 0
                state.samples_seen += self.run.global_batch
                continue
            state.skipped_steps += 1
            state.consecutive_skips += 1
            if dist.is_main():
                log.warning(
                    f"step {step}: non-finite loss or gradients; weights and optimizer state left unchanged"
                )
            if state.consecutive_skips >= cfg.max_nonfinite_steps:
                ckpt = self.run.ckpt
                raise JobError(
                    f"{state.consecutive_skips} consecutive non-finite losses/gradients up to step {step}: "
                    f"stopping. The last checkpoint ({ckpt.latest() or 'none'} in {ckpt.dir}) is intact; lower "
                    "the LR, enable gradient clipping or check the data, then resume."
                )


# ----------------------------------------------------------------------------------------------------
# logging, evaluation, saving


def _log(run: _Run, state: TrainState, window: MetricWindow, step: _Step, max_skip_rate: float) -> None:
    """The window's metrics reduced over ranks, written by rank 0; stops on too many unusable samples.
    Collective."""
    m = window.summary(run.global_batch, run.world, run.loader, run.device)
    grad_norm = run.engine.get_global_grad_norm() if step.grad_norm is None else step.grad_norm
    m.update(
        {
            "train/lr": run.engine.optimizer.param_groups[0]["lr"],
            "train/logit_scale": step.logit_scale.detach().float().item(),
            "train/epoch": state.epoch,
            "train/samples_seen": state.samples_seen,
            "train/skipped_steps": state.skipped_steps,
            **({"train/grad_norm": float(grad_norm)} if grad_norm is not None else {}),
        }
    )
    if run.metrics is not None:
        run.metrics.write(state.step, m, format_line(state.step, run.cfg.steps, m))
    window.restart()
    used, bad = m.get("data/used_samples", 0), m.get("data/unusable_samples", 0)
    if used + bad == 0 or bad / (used + bad) <= max_skip_rate:  # the same summed counts on every rank
        return
    reasons = {k.rsplit("/", 1)[1]: int(v) for k, v in m.items() if k.startswith("data/skipped/") and v}
    raise JobError(
        f"{bad:.0f} of the {used + bad:.0f} samples read so far were unusable ({bad / (used + bad):.1%}, "
        f"more than data.max_skip_rate={max_skip_rate:g}; skipped by reason: {reasons}): stopping. "
        f"The last checkpoint ({run.ckpt.latest() or 'none'} in {run.ckpt.dir}) is intact; check the shards or "
        "raise data.max_skip_rate, then rerun."
    )


def _evaluate(run: _Run, evaluate, model, step: int, prefix: str, label: str) -> dict:
    """`evaluate(model)` in eval mode on every rank (the student's full weights gathered under ZeRO-3);
    rank 0 logs the numbers as <prefix>/<key>. Collective."""
    gather = gathered(run.engine) if model is run.engine.module else contextlib.nullcontext()
    with eval_mode(model), gather, torch.no_grad():
        scores = flat_numbers(evaluate(model))
    if run.metrics is not None:
        run.metrics.write(step, {f"{prefix}/{k}": v for k, v in scores.items()}, f"{label}: {scores}")
    return scores


def _save(run: _Run, state: TrainState, skips: SkippedSteps) -> None:
    """Checkpoint (every rank) with the skip counts settled, then queue the log files for the mirror.
    Collective."""
    skips.settle()
    if run.data_position is not None:
        state.data = dist.all_gather_object(run.data_position)
    run.ckpt.save(run.engine, state.step, {"train_state": asdict(state)})
    dist.note_progress(checkpoint=str(run.ckpt.dir / step_tag(state.step)))
    if run.ckpt.mirror is not None:
        run.ckpt.mirror.sync(["metrics.jsonl", "tensorboard"])
