"""Single-process pieces of the trainer: param groups, LR schedule, DS config, the loss from the config,
checkpoint manager, mirror, metrics log and window, hidden-state recorder, step profiler."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from mope_dist.config import DeepSpeedConfig, DistillConfig, LossWeights
from mope_dist.distill import metrics
from mope_dist.distill.checkpoint import MARKER, CheckpointManager, Mirror, step_tag
from mope_dist.distill.losses import HiddenRecorder, make_loss
from mope_dist.distill.metrics import MetricsLog, MetricWindow
from mope_dist.distill.optim import build_ds_config, lr_at, param_groups
from mope_dist.distill.profile import HostSyncCounter, StepProfiler, busy_us


@pytest.fixture
def tiny_prunable(tiny_clip):
    from mope_dist.model import from_open_clip

    return from_open_clip(tiny_clip(layers=2, width=64, head_width=16))


def test_param_groups_exclude_norms_biases_embeddings_and_logit_scale(tiny_prunable):
    decay, no_decay = param_groups(tiny_prunable, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_prunable.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for n in (
        "logit_scale",
        "text.token_embedding.weight",
        "text.positional_embedding",
        "visual.class_embedding",
    ):
        assert n in exempt
    assert "visual.positional_embedding" in exempt
    assert all(n.endswith(("bias", "weight")) for n in exempt if "ln" in n)
    for n in (
        "visual.conv1.weight",
        "visual.proj",
        "text.text_projection",
        "visual.blocks.0.attn.qkv.weight",
    ):
        assert n in decayed
    assert not any(n.endswith("bias") for n in decayed)


def test_lr_schedule_warmup_then_cosine():
    base, warm, total, floor = 1e-3, 10, 110, 1e-5
    assert lr_at(0, base, warm, total, floor) == pytest.approx(base / warm)
    assert lr_at(9, base, warm, total, floor) == pytest.approx(base)
    assert lr_at(10, base, warm, total, floor) == pytest.approx(base)
    assert lr_at(60, base, warm, total, floor) == pytest.approx(floor + 0.5 * (base - floor))
    assert lr_at(110, base, warm, total, floor) == pytest.approx(floor)
    for s in range(10, 110):  # against the closed form
        ref = floor + 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))) * (base - floor)
        assert lr_at(s, base, warm, total, floor) == pytest.approx(ref)


def test_ds_config_dict():
    c = build_ds_config(DeepSpeedConfig(zero_stage=2, precision="bf16"), 8, 4, grad_clip=1.0)
    assert c["train_micro_batch_size_per_gpu"] == 8 and c["gradient_accumulation_steps"] == 4
    assert c["zero_optimization"] == {"stage": 2} and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["gradient_clipping"] == 1.0
    extra = {"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}
    c = build_ds_config(DeepSpeedConfig(zero_stage=0, precision="fp32", extra=extra), 8, 1, grad_clip=0.0)
    assert c["zero_optimization"] == {"stage": 0, "overlap_comm": True} and c["wall_clock_breakdown"]
    assert not c["bf16"]["enabled"] and not c["fp16"]["enabled"] and c["gradient_clipping"] == 0.0
    with pytest.raises(ValueError):
        build_ds_config(DeepSpeedConfig(zero_stage=4), 8, 1, 0.0)
    with pytest.raises(ValueError):
        build_ds_config(DeepSpeedConfig(precision="fp8"), 8, 1, 0.0)


def test_loss_is_the_configs_and_contrastive_only_without_a_teacher(tiny_prunable):
    from mope_dist.model import KeepSpec, TowerKeep, slice_model

    student = slice_model(
        tiny_prunable, KeepSpec(vision=TowerKeep(layers=[1]), text=TowerKeep(layers=[0, 1]))
    )
    losses = LossWeights(contrastive=0.5, kd=2.0, kd_temperature=3.0, embed=4.0, hidden=5.0)
    cfg = DistillConfig(losses=losses, local_loss=True)
    loss = make_loss(cfg, student, tiny_prunable)
    assert loss.weights == {"contrastive": 0.5, "kd": 2.0, "embed": 4.0, "hidden": 5.0}
    assert loss.temperature == 3.0 and loss.local_loss and not loss.gather_with_grad
    assert loss.image_layers == [1] and loss.text_layers == [0, 1]  # teacher block each kept layer came from
    alone = make_loss(cfg, student, None)  # plain CLIP training: the distillation weights do not apply
    assert alone.weights == {"contrastive": 0.5, "kd": 0.0, "embed": 0.0, "hidden": 0.0}
    assert not alone.needs_teacher and not alone.needs_hidden


class FakeEngine:
    """Writes/reads what DeepSpeed would, minus the tensors."""

    basic_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours, written only once the tag is complete
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x" * 100)

    def load_checkpoint(self, load_dir, tag, **kw):
        return f"{load_dir}/{tag}", json.loads(
            (Path(load_dir) / tag / "mp_rank_00_model_states.pt").read_text()
        )


def test_checkpoints_keep_last_k_and_never_take_an_incomplete_one(tmp_path):
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep=2)
    engine = FakeEngine()
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        ckpt.save(engine, step, {"train_state": {"step": step}})
    assert ckpt.complete_tags() == [step_tag(20), step_tag(30)]  # step 10 pruned
    assert (ckpt.dir / "latest").read_text().strip() == step_tag(30) == ckpt.latest()
    assert ckpt.load(engine, ckpt.latest())["train_state"]["step"] == 30

    # a save interrupted after some shards: `latest` still names step 30, the dir has no marker
    (ckpt.dir / step_tag(40)).mkdir()
    (ckpt.dir / step_tag(40) / "mp_rank_00_model_states.pt").write_text("{}")
    assert ckpt.latest() == step_tag(30)
    # `latest` pointing at a damaged checkpoint (a shard truncated): fall back to the newest complete one
    (ckpt.dir / "latest").write_text(step_tag(30))
    (ckpt.dir / step_tag(30) / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")
    assert ckpt.latest() == step_tag(20)
    # the next save replaces the leftovers of the crashed one and prunes what is not complete
    ckpt.save(engine, 40, {"train_state": {"step": 40}})
    assert ckpt.latest() == step_tag(40) and (ckpt.dir / step_tag(40) / MARKER).is_file()
    assert ckpt.complete_tags() == [step_tag(20), step_tag(40)] and not (ckpt.dir / step_tag(30)).exists()

    # step 60 complete but never named `latest` (the run died in between): the resumed run goes on from
    # step 40 and saves at 50, off the grid (preemption); 50 is kept, 60 (a future passed over) goes
    ckpt.save(engine, 60, {"train_state": {"step": 60}})
    (ckpt.dir / "latest").write_text(step_tag(40))
    ckpt.save(engine, 50, {"train_state": {"step": 50}})
    assert ckpt.complete_tags() == [step_tag(40), step_tag(50)] and ckpt.latest() == step_tag(50)


def test_mirror_copies_in_background_to_fsspec_url(tmp_path):
    import fsspec

    ckpt = CheckpointManager(tmp_path / "checkpoints", keep=1, mirror=Mirror("memory://run1", tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    ckpt.save(FakeEngine(), 1, {"train_state": {}})
    ckpt.save(FakeEngine(), 2, {"train_state": {}})
    ckpt.mirror.sync(["metrics.jsonl"])
    ckpt.mirror.close()
    fs = fsspec.filesystem("memory")
    assert fs.cat("/run1/checkpoints/latest").decode().strip() == step_tag(2)
    assert fs.exists(f"/run1/checkpoints/{step_tag(2)}/{MARKER}")
    assert not fs.exists(f"/run1/checkpoints/{step_tag(1)}")  # pruned remotely as well
    assert fs.cat("/run1/metrics.jsonl") == b'{"step": 1}\n'


def test_mirror_puts_the_marker_last_and_retries_what_failed(tmp_path):
    """An outage at the first checkpoint: its copy is retried with the next sync; each tag's marker is
    uploaded after its files, so a remote tag with a marker is whole."""
    import fsspec

    mirror = Mirror("memory://run2", tmp_path)
    put, order, outage = mirror.fs.put_file, [], [True]

    def flaky_put(local, remote, **kw):
        if outage.pop() if outage else False:
            raise OSError("503 Slow Down")
        order.append(remote.rsplit("/", 2)[-2:])
        return put(local, remote, **kw)

    mirror.fs.put_file = flaky_put
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep=2, mirror=mirror)
    ckpt.save(FakeEngine(), 1, {"train_state": {}})
    mirror._jobs.join()
    assert order == []  # the outage
    ckpt.save(FakeEngine(), 2, {"train_state": {}})
    mirror.close()
    fs = fsspec.filesystem("memory")
    for step in (1, 2):
        assert fs.exists(f"/run2/checkpoints/{step_tag(step)}/{MARKER}")
        names = [name for tag, name in order if tag == step_tag(step)]
        assert names[-1] == MARKER and len(names) == 3, names
    assert fs.cat("/run2/checkpoints/latest").decode().strip() == step_tag(2)


def test_metrics_log_forgets_steps_after_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write(step, {"loss/total": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss/to')  # torn line from a crash
    log = MetricsLog(tmp_path, resume_step=2)
    log.write(3, {"loss/total": 30.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss/total"]) for x in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert any((tmp_path / "tensorboard").iterdir())


def test_settings_kept_when_loading_a_non_fused_checkpoint():
    """A non-fused AdamW's state loaded into a fused one turns it non-fused (torch keeps the saved
    settings), which would refuse the found_inf flag; with its settings kept, it skips a flagged step
    exactly and continues like the non-fused optimizer it was saved from."""
    from mope_dist.distill.optim import settings_kept

    torch.manual_seed(0)
    w0, grads = torch.randn(8), [torch.randn(8) for _ in range(3)]
    old = torch.nn.Parameter(w0.clone())
    old_opt = torch.optim.AdamW([old], lr=0.1, fused=False)
    old.grad = grads[0]
    old_opt.step()
    new = torch.nn.Parameter(old.detach().clone())
    new_opt = torch.optim.AdamW([new], lr=0.1, fused=True)
    saved = copy.deepcopy(old_opt.state_dict())  # as if from disk: no moments shared with old_opt
    plain = torch.optim.AdamW([torch.nn.Parameter(old.detach().clone())], lr=0.1, fused=True)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["fused"] is False  # what a plain load does
    with settings_kept(new_opt):
        new_opt.load_state_dict(saved)
    assert new_opt.param_groups[0]["fused"] is True
    new.grad = torch.full((8,), float("nan"))
    new_opt.found_inf = torch.tensor(1.0)
    new_opt.step()  # skipped
    assert torch.equal(new, old) and float(new_opt.state[new]["step"]) == 1.0
    for g in grads[1:]:
        old.grad, new.grad = g.clone(), g.clone()
        new_opt.found_inf = torch.tensor(0.0)
        old_opt.step()
        new_opt.step()
    assert torch.allclose(new, old, rtol=0, atol=1e-6) and float(new_opt.state[new]["step"]) == 3.0


def test_window_throughput_leaves_out_paused_time_only(monkeypatch):
    """A checkpoint mid-window: the steps before it still count with their time (resetting the clock
    there used to drop that time and overstate samples/s)."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    window = MetricWindow()  # t0 = 0
    for t in (2.0, 4.0):  # two 2 s steps
        now[0] = t
        window.add_step({}, 1, False)
    with window.paused(torch.device("cpu")):  # a 10 s checkpoint
        now[0] += 10.0
    now[0] += 2.0  # a third 2 s step
    window.add_step({}, 1, False)
    m = window.summary(global_batch=8, world=1, loader=None, device=torch.device("cpu"))
    assert m["perf/step_time_s"] == pytest.approx(2.0) and m["perf/samples_per_s"] == pytest.approx(4.0)


def test_window_averages_the_losses_of_applied_steps_only():
    """Skipped steps, decided on the host (DeepSpeed) or flagged on the device (own clipping, applied
    there without a read), leave their NaN losses out; a window of skipped steps only logs NaN."""
    nan, flag = torch.tensor(float("nan")), torch.tensor
    window = MetricWindow()
    steps = [(1.0, False), (nan, True), (3.0, flag(0.0)), (nan, flag(1.0)), (5.0, flag(0.0))]
    for loss, skipped in steps:
        window.add_step({"total": torch.as_tensor(loss) * 2}, 2, skipped)  # summed over 2 micro-batches
    assert window.steps == 5  # every step took its time: throughput counts them all
    m = window.summary(global_batch=8, world=1, loader=None, device=torch.device("cpu"))
    assert m["loss/total"] == pytest.approx((1.0 + 3.0 + 5.0) / 3)
    window.restart()
    for skipped in (True, flag(1.0)):
        window.add_step({"total": nan}, 2, skipped)
    m = window.summary(global_batch=8, world=1, loader=None, device=torch.device("cpu"))
    assert math.isnan(m["loss/total"])


def test_skipped_steps_are_read_lazily_counted_and_stop_the_run(tmp_path):
    """Device flags wait unread until a settle; past `max_nonfinite_steps` pending, all but the newest
    are read (one read); counts, samples and the consecutive limit match a step-by-step count."""
    from types import SimpleNamespace

    from mope_dist.distill.trainer import SkippedSteps, TrainState
    from mope_dist.errors import JobError

    run = SimpleNamespace(
        cfg=DistillConfig(max_nonfinite_steps=3), global_batch=8, ckpt=CheckpointManager(tmp_path / "ckpt")
    )
    state = TrainState()
    skips = SkippedSteps(run, state)
    flags = [torch.tensor(0.0), torch.tensor(1.0), True, torch.tensor(0.0)]
    with HostSyncCounter() as counter:
        for step, flag in enumerate(flags[:3], 1):
            skips.add(step, flag)
    assert counter.sites == {} and state.skipped_steps == 0  # nothing read yet
    with HostSyncCounter() as counter:
        skips.add(4, flags[3])  # 4 pending > 3: steps 1-3 read, step 4 left
    assert sum(counter.sites.values()) == 1 and len(skips.pending) == 1
    assert (state.skipped_steps, state.consecutive_skips, state.samples_seen) == (2, 2, 8)
    skips.settle()
    assert (state.skipped_steps, state.consecutive_skips, state.samples_seen) == (2, 0, 16)
    for step in (5, 6):
        skips.add(step, torch.tensor(1.0))
    skips.settle()
    skips.add(7, torch.tensor(1.0))
    with pytest.raises(JobError, match="3 consecutive non-finite losses/gradients up to step 7"):
        skips.settle()


def test_host_sync_counter_counts_what_would_wait_for_a_gpu_by_call_site():
    """Value reads and data-dependent shapes, each once at its line; arithmetic, a non-fused AdamW step
    (its step counts live on the host) and reading a plain float are not counted; a read in mope_dist's
    code is charged to mope_dist's line."""
    import inspect

    t = torch.randn(16)
    w = torch.nn.Parameter(torch.randn(4))
    w.grad = torch.randn(4)
    opt = torch.optim.AdamW([w], foreach=False)
    window = MetricWindow()
    window.add_step({"loss": torch.tensor(2.0)}, 1, False)
    tolist = torch.Tensor.tolist
    here = inspect.currentframe().f_lineno
    with HostSyncCounter() as counter:
        t.sum().item()  # here + 2
        bool(t[0] > 0)  # here + 3
        t[t > 0]  # here + 4: boolean mask
        torch.nonzero(t)  # here + 5
        float(t.max())  # here + 6
        torch.unique(t)  # here + 7
        t.cpu().numpy()  # here + 8: two copies to the host
        (t * 2 + 1).exp().sum()
        opt.step()
        window.summary(global_batch=8, world=1, loader=None, device=torch.device("cpu"))
    assert torch.Tensor.tolist is tolist  # the counter's wrappers are gone
    ours = {
        site.split(":")[1]: n
        for site, n in counter.sites.items()
        if site.startswith("tests/test_distill_parts.py:")
    }
    name = "test_host_sync_counter_counts_what_would_wait_for_a_gpu_by_call_site"
    expected = {f"{here + i} {name}": 2 if i == 8 else 1 for i in range(2, 9)}
    assert ours == expected
    library = {site: n for site, n in counter.sites.items() if not site.startswith("tests/")}
    assert [s.split(":")[0] for s in library] == ["mope_dist/distill/metrics.py"], library  # its .tolist()


@pytest.mark.parametrize("seed", range(5))
def test_busy_time_is_the_union_of_overlapping_spans(seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 90, (12,), generator=g).tolist()
    spans = [(a, a + int(torch.randint(1, 15, (1,), generator=g))) for a in starts]
    covered = {t for a, b in spans for t in range(a, b)}  # naive: count the covered unit cells
    assert busy_us([(float(a), float(b)) for a, b in spans]) == len(covered)


def test_step_profiler_profiles_its_window_only(tmp_path):
    """Window over steps 3-4 of 6, driven as the trainer does: per-step figures are over those 2
    steps, the files hold their ops only."""
    profiler = StepProfiler(2, 2, torch.device("cpu"), tmp_path / "profile")
    a = torch.randn(64, 64)
    summaries, opened = {}, []
    for done in range(6):
        if profiler.opens_at(done):
            profiler.open()
            opened.append(done)
        if done in (2, 3):
            a.mm(a).relu()
        else:
            a.add(a).sigmoid()
        if profiler.closes_at(done + 1):
            summaries[done + 1] = profiler.close_window()
    profiler.close()
    assert opened == [2] and list(summaries) == [4]
    summary = summaries[4]
    assert summary["steps"] == 2 and summary["wall_ms"] > 0 and summary["device_busy_ms"] == 0
    assert summary["host_ops_ms"] > 0
    assert json.loads((tmp_path / "profile" / "summary_rank0.json").read_text()) == summary
    ops = (tmp_path / "profile" / "ops_rank0.txt").read_text()
    assert "aten::mm" in ops and "aten::relu" in ops and "aten::sigmoid" not in ops
    assert (tmp_path / "profile" / "trace_rank0.json.gz").stat().st_size > 0
    off = StepProfiler(0, 0, torch.device("cpu"), tmp_path / "off")
    assert not any(off.opens_at(d) for d in range(3)) and not off.closes_at(0)


def test_step_profiler_cut_short_writes_nothing(tmp_path):
    profiler = StepProfiler(0, 5, torch.device("cpu"), tmp_path / "profile")
    profiler.open()
    profiler.close()  # training ended inside the window
    profiler.close()
    assert profiler.prof is None and not (tmp_path / "profile").exists()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hidden_recorder_matches_the_towers_own_hidden_states(tiny_prunable, checkpointing):
    from conftest import tiny_images, tiny_texts

    model = tiny_prunable.train()
    model.set_grad_checkpointing(checkpointing)
    images, texts = tiny_images(3), tiny_texts(3)
    recorder = HiddenRecorder(model)
    out = recorder(model, images, texts)
    _, ref_image = model.encode_image(images, return_hidden=True)
    _, ref_text = model.encode_text(texts, return_hidden=True)
    assert len(out.image_hidden) == len(ref_image) == 2 and len(out.text_hidden) == len(ref_text) == 2
    for a, b in zip(out.image_hidden + out.text_hidden, ref_image + ref_text, strict=True):
        torch.testing.assert_close(a, b)
    (out.image.sum() + sum(h.sum() for h in out.image_hidden)).backward()  # recomputation records nothing
    assert len(recorder.hidden["visual"]) == 2
    model(images, texts)  # outside a recorder call nothing is kept
    assert len(recorder.hidden["visual"]) == 2
