"""The image-text loader's data position: resumed runs (any number of interruptions, 2 DataLoader workers,
a new process each time) consume exactly the uninterrupted run's batches; skipping decodes nothing and
opens only the shards it needs; a position saved on 2 ranks resumes on 1, then on 2 again (and on 3),
finishing the interrupted epoch with exactly the samples the uninterrupted run would have used. Ranks are
simulated in one process with explicit rank/world_size; samples carry their id in the caption."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter

import pytest
import torch
import webdataset as wds
from test_data import id_records, id_tokenizer, tiny_jpeg, write_id_shards
from torchvision.transforms.functional import pil_to_tensor

from mope_dist.data import ImageTextLoader, image_text, shards
from mope_dist.data.synthetic import write_tar


def make(spec, batch_size=4, workers=2, **kw) -> ImageTextLoader:
    kw.setdefault("shuffle_buffer", 6)
    return ImageTextLoader(spec, pil_to_tensor, id_tokenizer, batch_size, workers, seed=3, **kw)


def batches(loader, n: int) -> list[list[int]]:
    """The next `n` batches (ids), going on into the next epochs like the trainer does."""
    out: list[list[int]] = []
    while len(out) < n:
        for _, tokens in loader:
            out.append(tokens[:, 0].tolist())
            if len(out) == n:
                break
    return out


def messy_shards(root) -> str:
    """8 shards of 12 samples (sizes.json), one of them truncated after 5, with an undecodable image and a
    sample without caption: the position must account for samples that never make it into a batch."""
    spec = write_id_shards(root, [12] * 8)
    records = id_records(24, 12)
    records[3] = (records[3][0], {"jpg": b"not a jpeg", "txt": b"sample 27"})
    records[7] = (records[7][0], {"jpg": tiny_jpeg(31)})
    write_tar(root / "000002.tar", records)
    full = (root / "000005.tar").read_bytes()
    (root / "000005.tar").write_bytes(full[: len(full) // 2])  # sizes.json still says 12
    return spec


@pytest.mark.parametrize("mode", ["finite", "resampled"])
def test_resumes_at_random_points_give_the_uninterrupted_sequence(tmp_path, mode):
    spec = messy_shards(tmp_path)
    total = 2 * make(spec, mode=mode).num_batches + 5  # into a third epoch
    reference = batches(make(spec, mode=mode), total)
    cuts = sorted(random.Random(mode).sample(range(1, total), 5)) + [total]
    got, state, done = [], None, 0
    for cut in cuts:  # a new loader (new worker processes) from the saved position each time
        loader = make(spec, mode=mode)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps([state])))  # what a checkpoint holds
        got += batches(loader, cut - done)
        state, done = loader.state_dict(), cut
        del loader
    assert got == reference


def test_set_epoch_resumes_twice_in_one_epoch(tmp_path):
    """The reported case: resume at step 1, take one batch, resume at step 2 (2 workers)."""
    spec = write_id_shards(tmp_path, [10] * 4)
    reference = batches(make(spec), 10)
    first = make(spec)
    first.set_epoch(0, 1)
    second = make(spec)
    second.set_epoch(0, 2)
    assert reference[:1] + batches(first, 1) + batches(second, 8) == reference
    assert sorted(sum(reference, [])) == list(range(40))


def _logged_calls(monkeypatch, path, module, name):
    """Wrap module.name so that every call (in any worker process) appends its first argument to `path`."""
    original = getattr(module, name)

    def wrapper(arg, *a, **kw):
        with open(path, "a") as f:
            f.write(f"{arg if isinstance(arg, str) else 'image'}\n")
        return original(arg, *a, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return lambda: path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("known_sizes", [True, False])
def test_skipping_decodes_nothing_and_opens_only_the_shards_it_needs(tmp_path, monkeypatch, known_sizes):
    spec = write_id_shards(tmp_path / "d", [12] * 8, with_sizes_json=known_sizes)
    kw = {} if known_sizes else {"samples_per_epoch": 96}
    reference = batches(make(spec, shuffle_buffer=4, **kw), 24)
    decoded = _logged_calls(monkeypatch, tmp_path / "decoded", image_text, "decode_image")
    opened = _logged_calls(monkeypatch, tmp_path / "opened", shards, "open_shard")
    loader = make(spec, shuffle_buffer=4, **kw)
    loader.set_epoch(0, 20)  # 4 of 24 batches left: 10 of each worker's 12 done
    assert batches(loader, 4) == reference[20:]
    assert len(decoded()) == 4 * 4  # only the samples of the batches it yields
    # each worker has 4 shards of 12 samples and has used 40 of them: with sizes known it opens only
    # the shards that still hold unused samples (the last one, and one more with samples in the buffer)
    distinct = set(opened())
    assert len(distinct) <= 4 if known_sizes else len(distinct) == 8


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("mode", ["finite", "resampled"])
def test_world_2_to_1_to_2_finishes_the_interrupted_epoch_exactly(tmp_path, mode):
    """Unbalanced shards (workers short of data repeat theirs): the samples of the interrupted epoch, over
    three layouts, are the uninterrupted 2-rank epoch's samples, each as often."""
    spec = write_id_shards(tmp_path, [20, 6, 14, 8, 16, 10, 12, 10])  # 96 = 12 batches x 4 x 2 ranks

    def ranks(world, batch_size, workers=2):
        return [make(spec, batch_size, workers, mode=mode, rank=r, world_size=world) for r in range(world)]

    reference = Counter(i for loader in ranks(2, 4) for batch in batches(loader, 12) for i in batch)
    assert sum(reference.values()) == 96
    seen: Counter = Counter()
    two = ranks(2, 4)
    for loader in two:
        seen.update(i for batch in batches(loader, 3) for i in batch)
    states = [loader.state_dict() for loader in two]
    (one,) = ranks(1, 8, workers=3)  # world 1, another worker count, the same global batch
    one.load_state_dict(states)
    seen.update(i for batch in batches(one, 4) for i in batch)
    states = [one.state_dict()]
    again = ranks(2, 4)
    rest = []
    for loader in again:
        loader.load_state_dict(states)
        rest.append([i for _, tokens in loader for i in tokens[:, 0].tolist()])
        assert loader.epoch == 1  # the epoch is finished, the next one starts
    assert len(rest[0]) == len(rest[1]) == (12 - 3 - 4) * 4  # equal batch counts on every rank
    seen.update(rest[0] + rest[1])
    assert seen == reference
    next_epoch = [batches(loader, 12) for loader in again]
    assert all(len(b) == 12 for b in next_epoch)


def test_growing_to_3_ranks_leaves_out_only_the_tail(tmp_path):
    spec = write_id_shards(tmp_path, [12] * 8)  # balanced: the uninterrupted epoch is every sample once
    two = [make(spec, 4, rank=r, world_size=2) for r in range(2)]
    seen = Counter(i for loader in two for batch in batches(loader, 3) for i in batch)
    states = [loader.state_dict() for loader in two]
    rest, lines = [], []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("mope_dist").addHandler(handler)
    try:
        for r in range(3):  # 72 samples left, 15 per global batch: 4 batches per rank, 12 left out
            loader = make(spec, 5, 1, rank=r, world_size=3)
            loader.load_state_dict(states)
            rest.append([i for _, tokens in loader for i in tokens[:, 0].tolist()])
    finally:
        logging.getLogger("mope_dist").removeHandler(handler)
    assert [len(r) for r in rest] == [20, 20, 20]
    seen.update(sum(rest, []))
    assert max(seen.values()) == 1 and len(seen) == 96 - 12
    assert any(
        "72 samples left in epoch 0 are redistributed, 4 batches per rank; 12 left out" in x for x in lines
    )


def test_user_stages_filter_and_decode_and_keep_the_position(tmp_path):
    spec = write_id_shards(tmp_path, [12] * 8)
    stages = [wds.select(lambda s: int(s["__key__"]) % 3 != 0), wds.decode("pil")]
    reference = batches(make(spec, stages=stages, samples_per_epoch=64), 16)
    assert all(i % 3 for batch in reference for i in batch)
    loader = make(spec, stages=stages, samples_per_epoch=64)
    head = batches(loader, 5)
    resumed = make(spec, stages=stages, samples_per_epoch=64)
    resumed.load_state_dict([loader.state_dict()])
    assert head + batches(resumed, 11) == reference
    broken = make(spec, stages=[wds.map(lambda s: {k: v for k, v in s.items() if k != "__index__"})])
    with pytest.raises(RuntimeError, match="__index__"):
        batches(broken, 1)


def test_a_position_from_another_run_is_refused(tmp_path):
    spec = write_id_shards(tmp_path, [12] * 8)
    state = make(spec).state_dict()
    loader = ImageTextLoader(spec, pil_to_tensor, id_tokenizer, 4, 2, seed=4)
    with pytest.raises(ValueError, match="does not fit this loader"):
        loader.load_state_dict([state])


def test_random_crops_are_the_same_after_resumes_also_on_another_worker_count(tmp_path):
    """The transform's random crop is drawn from the sample (seed, epoch, shard, key), so a run resumed
    mid-epoch gets the uninterrupted run's pixels, not only its samples; resumed on 1 worker instead
    of 2, the rest of the epoch holds the same cropped images (batched in another order)."""
    from torchvision.transforms import Compose, PILToTensor, RandomResizedCrop

    from mope_dist.data.synthetic import write_image_text_shards

    spec = write_image_text_shards(tmp_path / "shards", 32, 8, image_size=24)
    crop = Compose([RandomResizedCrop(12, scale=(0.1, 1.0)), PILToTensor()])

    def loader(workers, state=None):
        tokenizer = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731
        made = ImageTextLoader(spec, crop, tokenizer, 4, workers, seed=3, shuffle_buffer=6)
        if state is not None:
            made.load_state_dict([state])
        return made

    def images(batches) -> list[bytes]:
        return [image.numpy().tobytes() for batch, _ in batches for image in batch]

    reference = images(loader(2))  # one epoch: 8 batches
    first = loader(2)
    head = images(itertools.islice(first, 3))
    assert head + images(loader(2, first.state_dict())) == reference
    assert sorted(images(loader(1, first.state_dict()))) == sorted(reference[len(head) :])
    assert len(set(reference)) == len(reference)  # every crop differs

    def rng_after(transform):  # without workers the crops are drawn in this process
        torch.manual_seed(0)
        tokenizer = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731
        list(ImageTextLoader(spec, transform, tokenizer, 4, 0, seed=3, shuffle_buffer=6))
        return torch.get_rng_state()

    assert torch.equal(rng_after(crop), rng_after(PILToTensor()))  # the caller's RNG is left as it was


def test_a_shard_shorter_than_its_declared_size_is_counted_and_named(tmp_path):
    """Intact, but 4 samples where sizes.json says 12: its samples are used, the shortfall is counted
    (short_shard) and the shard named once, instead of being made up silently by repeats."""
    spec = write_id_shards(tmp_path, [12] * 4)
    write_tar(tmp_path / "000002.tar", id_records(24, 4))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("mope_dist").addHandler(handler)
    try:
        loader = make(spec, workers=0)  # in this process: its log lines reach the handler
        got = [i for _, tokens in loader for i in tokens[:, 0].tolist()]
    finally:
        logging.getLogger("mope_dist").removeHandler(handler)
    assert set(range(24, 28)) <= set(got) and loader.skipped()["short_shard"] >= 1
    short = [x for x in lines if "000002.tar holds 4 samples, fewer than its declared 12" in x]
    assert len(short) == 1, lines
