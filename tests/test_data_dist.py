"""The data loaders in a real 2-process gloo group with 2 DataLoader workers per rank: rank and world size
come from the process group, every batch is followed by an all-reduce (a rank with fewer batches would
hang it), and the union over ranks is compared with what was written."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os

import torch
import torch.distributed as tdist
import torch.multiprocessing as tmp
from conftest import free_port
from test_data import id_tokenizer, write_id_shards
from torchvision.transforms.functional import pil_to_tensor

from mope_dist.data import ImageTextLoader, make_labelled_loader
from mope_dist.data.synthetic import write_labelled_set
from mope_dist.dist import all_reduce_sum, init_distributed


def _synced(loader) -> tuple[list[int], int]:
    """Iterate like a training loop: one collective per batch."""
    ids, batches = [], 0
    for _, tokens in loader:
        ids += tokens[:, 0].tolist()
        batches += 1
        all_reduce_sum(torch.ones(1))
    return ids, batches


def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    # children of mp.spawn default to spawn-started DataLoader workers (each re-imports torch: slow);
    # launcher-started ranks fork them, as here
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = init_distributed(timeout_s=60)
    assert (info.rank, info.world_size) == (rank, world)
    out = {}
    even = ImageTextLoader(f"{root}/even/{{000000..000007}}.tar", pil_to_tensor, id_tokenizer, 8, 2, seed=7)
    out["even"] = [_synced(even) for _ in range(2)]  # two epochs
    uneven = ImageTextLoader(f"{root}/uneven/{{000000..000007}}.tar", pil_to_tensor, id_tokenizer, 4, 2)
    out["uneven"] = [_synced(uneven), uneven.num_batches]
    res = ImageTextLoader(
        f"{root}/even/{{000000..000007}}.tar", pil_to_tensor, id_tokenizer, 8, 2, mode="resampled"
    )
    out["resampled"] = _synced(res)
    labelled = make_labelled_loader(f"{root}/labelled", pil_to_tensor, 16, num_workers=2, max_per_class=3)
    out["labelled"] = [
        [
            (hashlib.md5(img.numpy().tobytes()).hexdigest(), int(y))
            for x, ys in labelled
            for img, y in zip(x, ys, strict=True)
        ],
        labelled.total_samples,
    ]
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    tdist.destroy_process_group()


def test_two_ranks_two_workers(tmp_path):
    write_id_shards(tmp_path / "even", [12] * 8)  # 96 = 2 ranks x 2 workers x 3 batches x 8
    write_id_shards(tmp_path / "uneven", [40, 3, 1, 2, 30, 2, 9, 1])  # 88 samples, lopsided
    write_labelled_set(tmp_path / "labelled", per_class=5)  # 24 classes x 3 kept = 72 over 2 ranks
    tmp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    for epoch in range(2):
        (ids0, n0), (ids1, n1) = r0["even"][epoch], r1["even"][epoch]
        assert n0 == n1 == 6
        assert sorted(ids0 + ids1) == list(range(96))  # every sample exactly once per epoch
    assert r0["even"][0][0] != r0["even"][1][0]

    (ids0, n0), nb0 = r0["uneven"]
    (ids1, n1), nb1 = r1["uneven"]
    assert n0 == n1 == nb0 == nb1 == 88 // 8 and len(ids0) == len(ids1) == 44

    (ids0, n0), (ids1, n1) = r0["resampled"], r1["resampled"]
    assert n0 == n1 == 6 and ids0 != ids1

    part0, total = r0["labelled"]
    part1, _ = r1["labelled"]
    assert total == 72 and abs(len(part0) - len(part1)) <= 1
    assert len(part0) + len(part1) == 72 and len({tuple(p) for p in part0 + part1}) == 72
