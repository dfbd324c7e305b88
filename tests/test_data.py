"""Data package: shard specs, the image-text loader (counts, modes, resume, corrupt input), labelled and
retrieval sets, synthetic data. Samples carry their id in the caption ("sample 17") and an id tokenizer
turns captions back into ids, so every check compares against a plain list of what was written."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections import Counter

import fsspec
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from mope_dist.data import (
    SKIP_REASONS,
    ImageTextLoader,
    expand_shards,
    image_text,
    load_classnames,
    load_retrieval_set,
    load_templates,
    make_labelled_loader,
    shard_sizes,
)
from mope_dist.data.shards import ShardError, iter_shard_samples, iter_tar_files
from mope_dist.data.synthetic import (
    CLASSNAMES,
    write_image_text_shards,
    write_labelled_set,
    write_retrieval_set,
    write_tar,
)


def id_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[int(t.split()[-1])] for t in texts])


def tiny_jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, (i * 7) % 256, 50)).save(buf, format="JPEG")
    return buf.getvalue()


def id_records(start: int, n: int) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"{i:06d}", {"jpg": tiny_jpeg(i), "txt": f"sample {i}".encode()}) for i in range(start, start + n)
    ]


def write_id_shards(root, sizes: list[int], with_sizes_json: bool = True) -> str:
    """Shards of id-captioned samples with the given per-shard counts; returns a brace spec."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for s, n in enumerate(sizes):
        write_tar(root / f"{s:06d}.tar", id_records(start, n))
        start += n
    if with_sizes_json:
        (root / "sizes.json").write_text(json.dumps({f"{s:06d}.tar": n for s, n in enumerate(sizes)}))
    return str(root / f"{{000000..{len(sizes) - 1:06d}}}.tar")


def collect(loader) -> tuple[list[int], int]:
    ids, batches = [], 0
    for images, tokens in loader:
        assert images.shape[0] == tokens.shape[0] == loader.batch_size
        ids += tokens[:, 0].tolist()
        batches += 1
    return ids, batches


# ---- shard specs -------------------------------------------------------------------------------------


def test_expand_shards_braces_sources_weights_lists(tmp_path):
    assert expand_shards("a/{00..02}.tar") == [(["a/00.tar", "a/01.tar", "a/02.tar"], 1.0)]
    assert expand_shards("a/{0..1}.tar@2::s3://b/{x,y}.tar@0.5") == [
        (["a/0.tar", "a/1.tar"], 2.0),
        (["s3://b/x.tar", "s3://b/y.tar"], 0.5),
    ]
    assert expand_shards(["a.tar", "memory://m/{0..1}.tar"]) == [
        (["a.tar"], 1.0),
        (["memory://m/0.tar", "memory://m/1.tar"], 1.0),
    ]
    assert expand_shards("pipe:cat d/{0..1}.tar") == [(["pipe:cat d/0.tar", "pipe:cat d/1.tar"], 1.0)]
    assert expand_shards("gs://bucket@x/s.tar") == [(["gs://bucket@x/s.tar"], 1.0)]  # '@' not a weight
    write_id_shards(tmp_path / "d", [1, 1])
    assert expand_shards(tmp_path / "d") == [
        ([str(tmp_path / "d/000000.tar"), str(tmp_path / "d/000001.tar")], 1.0)
    ]
    for bad in ["a.tar::", "a.tar@0", "@2"]:
        with pytest.raises(ValueError):
            expand_shards(bad)


def test_shard_sizes_from_sizes_json_and_stats(tmp_path):
    spec = write_id_shards(tmp_path / "a", [3, 5])
    assert shard_sizes(expand_shards(spec)[0][0]) == [3, 5]
    write_id_shards(tmp_path / "b", [4], with_sizes_json=False)
    (tmp_path / "b/000000_stats.json").write_text(json.dumps({"successes": 4, "failed_to_download": 1}))
    assert shard_sizes([str(tmp_path / "b/000000.tar"), "pipe:cat x.tar", str(tmp_path / "c.tar")]) == [
        4,
        None,
        None,
    ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    """Our lean reader vs the standard library on long names, directories, links, empty and odd sizes."""
    path = tmp_path / "t.tar"
    files = {"a.jpg": b"x" * 513, "a.txt": b"", "d/" + "n" * 120 + ".txt": b"long", "ü.json": b"{}"}
    if fmt == tarfile.USTAR_FORMAT:
        files.pop("d/" + "n" * 120 + ".txt")
        files["p" * 90 + "/" + "q" * 90 + ".txt"] = b"prefix field"
    with tarfile.open(path, "w", format=fmt) as tar:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(path, "rb") as f:
        assert list(iter_tar_files(f)) == expected == list(files.items())
    with open(path, "rb") as f:
        (tmp_path / "t.tar.gz").write_bytes(gzip.compress(f.read()))
    assert [s["__key__"] for s in iter_shard_samples(str(tmp_path / "t.tar.gz"))][:1] == ["a"]


def test_truncated_tar_detected_at_every_cut(tmp_path):
    """tarfile treats a tar cut at a header boundary as complete; every cut must count as truncated."""
    write_tar(tmp_path / "full.tar", id_records(0, 4))
    data = (tmp_path / "full.tar").read_bytes()
    end = len(data.rstrip(b"\0")) + (-len(data.rstrip(b"\0"))) % 512  # where the end-of-archive blocks start
    for cut in [0, 100, 512, 700, 1024, 2048, 2050, end - 512, end, end + 100]:
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        got = []
        with pytest.raises(ShardError) as err:
            got.extend(s["__key__"] for s in iter_shard_samples(str(tmp_path / "cut.tar"), retry_delay=0.0))
        assert err.value.reason == ("truncated_shard" if got else "unreadable_shard"), cut
        assert got == [f"{i:06d}" for i in range(len(got))]
    (tmp_path / "cut.tar").write_bytes(data[: end + 512])  # one end block is enough
    assert len(list(iter_shard_samples(str(tmp_path / "cut.tar")))) == 4


# ---- image-text loader -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_finite_epoch_sees_every_sample_once_across_simulated_ranks(tmp_path, workers):
    spec = write_id_shards(tmp_path, [12] * 8)  # 96 samples = 2 ranks x 6 batches x 8
    per_epoch = []
    for epoch in range(2):
        ids = []
        for rank in range(2):
            loader = ImageTextLoader(
                spec, pil_to_tensor, id_tokenizer, 8, workers, seed=1, rank=rank, world_size=2, epoch=epoch
            )
            got, batches = collect(loader)
            assert batches == loader.num_batches == 6
            ids += got
        assert sorted(ids) == list(range(96))
        per_epoch.append(ids)
    assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch


def test_unequal_shards_still_give_equal_batch_counts(tmp_path):
    spec = write_id_shards(tmp_path, [40, 3, 1, 2, 30, 2, 9, 1])  # 88 samples
    for rank in range(2):
        loader = ImageTextLoader(spec, pil_to_tensor, id_tokenizer, 4, 2, rank=rank, world_size=2)
        assert loader.num_batches == 88 // 8
        ids, batches = collect(loader)
        assert batches == 11 and len(ids) == 44


def test_finite_resume_mid_epoch_continues_without_replay(tmp_path):
    spec = write_id_shards(tmp_path, [10] * 4)
    full = ImageTextLoader(spec, pil_to_tensor, id_tokenizer, 4, 2, seed=5)
    batches = [tokens[:, 0].tolist() for _, tokens in full]
    assert full.num_batches == 10 and full.epoch == 1
    resumed = ImageTextLoader(spec, pil_to_tensor, id_tokenizer, 4, 2, seed=5, start_step=3)
    rest, n = collect(resumed)
    assert n == 7
    assert sorted(sum(batches[:3], []) + rest) == list(range(40))


def test_resampled_deterministic_differs_across_ranks_and_resume(tmp_path):
    spec = write_id_shards(tmp_path, [16] * 6)

    def run(rank=0, start_step=0, seed=0, epoch=0, workers=0):
        loader = ImageTextLoader(
            spec, pil_to_tensor, id_tokenizer, 4, workers, mode="resampled", seed=seed, rank=rank, world_size=2,
            epoch=epoch, start_step=start_step, shuffle_buffer=8,
        )  # fmt: skip
        ids, n = collect(loader)
        assert n == loader.num_batches - start_step
        return ids

    two_workers = run(workers=2)
    assert run(workers=2) == two_workers  # reproducible with worker processes too
    base = run()
    assert len(base) == 96 // 8 * 4 and base != two_workers
    assert run() == base
    assert run(rank=1) != base
    assert run(seed=1) != base
    assert run(epoch=1) != base
    assert run(start_step=3) == base[3 * 4 :]  # a resume continues the same stream


def test_resampled_weights_follow_spec(tmp_path):
    a = write_id_shards(tmp_path / "a", [4] * 2)  # ids 0..7
    b = write_id_shards(tmp_path / "b", [4] * 2)
    for s in range(2):  # b holds ids 100..107
        write_tar(tmp_path / f"b/{s:06d}.tar", id_records(100 + 4 * s, 4))
    loader = ImageTextLoader(
        f"{a}@1::{b}@3",
        pil_to_tensor,
        id_tokenizer,
        8,
        0,
        mode="resampled",
        samples_per_epoch=800,
        shuffle_buffer=16,
    )
    ids, _ = collect(loader)
    frac_b = sum(i >= 100 for i in ids) / len(ids)
    assert 0.65 < frac_b < 0.85  # expected 0.75 (200 shard draws: std 0.03)
    with pytest.raises(ValueError, match="resampled"):
        ImageTextLoader(f"{a}@1::{b}@3", pil_to_tensor, id_tokenizer, 8, 0)


def test_loader_clear_errors(tmp_path):
    spec = write_id_shards(tmp_path / "a", [4] * 3)
    with pytest.raises(ValueError, match=r"2 x 2 = 4 shards, got 3"):
        ImageTextLoader(spec, pil_to_tensor, id_tokenizer, 2, 2, rank=0, world_size=2)
    nosize = write_id_shards(tmp_path / "b", [4] * 2, with_sizes_json=False)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ImageTextLoader(nosize, pil_to_tensor, id_tokenizer, 2)
    assert ImageTextLoader(nosize, pil_to_tensor, id_tokenizer, 2, samples_per_epoch=8).num_batches == 4
    with pytest.raises(FileNotFoundError):
        ImageTextLoader(
            str(tmp_path / "missing/{0..3}.tar"), pil_to_tensor, id_tokenizer, 2, samples_per_epoch=8
        )


def test_memory_and_pipe_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    for s in range(2):
        buf = tmp_path / f"{s}.tar"
        write_tar(buf, id_records(10 * s, 10))
        fs.pipe(f"/mope_test/{s:06d}.tar", buf.read_bytes())
    fs.pipe("/mope_test/sizes.json", json.dumps({"000000.tar": 10, "000001.tar": 10}).encode())
    loader = ImageTextLoader("memory://mope_test/{000000..000001}.tar", pil_to_tensor, id_tokenizer, 5)
    assert loader.num_batches == 4
    assert sorted(collect(loader)[0]) == list(range(20))
    loader = ImageTextLoader(
        f"pipe:cat {tmp_path}/{{0..1}}.tar", pil_to_tensor, id_tokenizer, 5, samples_per_epoch=20
    )
    assert sorted(collect(loader)[0]) == list(range(20))


def test_corrupt_input_skipped_and_counted(tmp_path):
    """Truncated tar, undecodable jpg, empty caption, missing caption/image, unreadable shard (file and
    failing pipe): all skipped and counted; the epoch still has its batch count."""
    write_tar(tmp_path / "good0.tar", id_records(0, 8))
    write_tar(tmp_path / "good1.tar", id_records(8, 8))
    bad = [
        ("b0", {"jpg": b"not a jpeg", "txt": b"sample 900"}),
        ("b1", {"jpg": tiny_jpeg(1), "txt": b"   "}),
        ("b2", {"jpg": tiny_jpeg(2)}),
        ("b3", {"txt": b"sample 903"}),
    ] + id_records(16, 8)
    write_tar(tmp_path / "bad.tar", bad)
    write_tar(tmp_path / "full.tar", id_records(30, 8))
    cut = tarfile.open(tmp_path / "full.tar").getmembers()[8].offset_data + 10  # inside sample 34's jpg
    (tmp_path / "trunc.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:cut])
    names = ["good0.tar", "good1.tar", "bad.tar", "trunc.tar", "nope.tar"]
    spec = [str(tmp_path / n) for n in names] + ["pipe:false"]
    expected = {
        **dict.fromkeys(SKIP_REASONS, 0),
        "missing_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_image": 1,
        "truncated_shard": 1,
        "unreadable_shard": 2,
    }
    events = dict(zip(spec, [["good"] * 8, ["good"] * 8, ["bad_image", "empty_caption", "missing_caption",
        "missing_image"] + ["good"] * 8, ["good"] * 4 + ["truncated_shard"], ["unreadable_shard"],
        ["unreadable_shard"]], strict=True))  # fmt: skip
    # reference: a walk over the shards in the loader's documented order (webdataset's SimpleShardList
    # shuffled by "seed/epoch"), counting what comes before the 28th good sample
    walk = [e for d in wds.SimpleShardList(spec, seed="0/0") for e in events[d["url"]]]
    last_good = [i for i, e in enumerate(walk) if e == "good"][27]
    in_order = Counter(e for e in walk[:last_good] if e != "good")
    # one worker, in order, an epoch of exactly the 28 good samples
    loader = ImageTextLoader(
        spec, pil_to_tensor, id_tokenizer, 4, 0, samples_per_epoch=28, retry_delay=0.0, shuffle_buffer=1
    )
    ids, n = collect(loader)
    assert n == loader.num_batches == 7
    assert sorted(ids) == list(range(24)) + list(range(30, 34))
    assert loader.skipped() == {**dict.fromkeys(SKIP_REASONS, 0), **in_order}
    # two workers wrapping around their shards: counts from both worker processes reach the rank
    loader = ImageTextLoader(spec, pil_to_tensor, id_tokenizer, 4, 2, samples_per_epoch=120, retry_delay=0.0)
    ids, n = collect(loader)
    assert n == loader.num_batches == 30 and set(ids) <= set(range(34))
    assert all(loader.skipped()[k] >= v for k, v in expected.items())


def test_only_bad_samples_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(image_text, "_MAX_BAD_IN_A_ROW", 50)
    write_tar(tmp_path / "bad.tar", [(f"{i}", {"jpg": b"junk", "txt": b"sample 1"}) for i in range(4)])
    loader = ImageTextLoader(str(tmp_path / "bad.tar"), pil_to_tensor, id_tokenizer, 2, samples_per_epoch=4)
    with pytest.raises(RuntimeError, match="50 unusable samples in a row"):
        collect(loader)


def test_open_clip_transform_and_tokenizer(tmp_path):
    spec = write_image_text_shards(tmp_path / "s", 40, 10, seed=0)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    preprocess = open_clip.image_transform(32, is_train=True)
    loader = ImageTextLoader(spec, preprocess, tokenizer, 8, 2, mode="resampled")
    images, tokens = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (8, 16) and tokens.dtype == torch.long


# ---- synthetic data ---------------------------------------------------------------------------------


def test_synthetic_shards_deterministic_with_sizes(tmp_path):
    spec = write_image_text_shards(tmp_path / "a", 25, 10, seed=3)
    write_image_text_shards(tmp_path / "b", 25, 10, seed=3)
    write_image_text_shards(tmp_path / "c", 25, 10, seed=4)
    assert spec == str(tmp_path / "a/{000000..000002}.tar")
    assert json.loads((tmp_path / "a/sizes.json").read_text()) == {
        "000000.tar": 10,
        "000001.tar": 10,
        "000002.tar": 5,
    }
    for name in ["000000.tar", "000002.tar"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    with pytest.raises(FileExistsError):
        write_image_text_shards(tmp_path / "a", 5, 5)


# ---- labelled sets ----------------------------------------------------------------------------------


def test_labelled_folder_and_cls_shards_agree_with_imagefolder(tmp_path):
    root = write_labelled_set(
        tmp_path / "val", per_class=3, shard_dir=tmp_path / "shards", samples_per_shard=20
    )
    names = load_classnames(root / "classnames.txt", num_classes=len(CLASSNAMES))
    assert names == list(CLASSNAMES)
    reference = ImageFolder(str(root), transform=pil_to_tensor)
    expected = Counter((tuple(img.flatten().tolist()), label) for img, label in reference)

    def pairs(source, **kw):
        loader = make_labelled_loader(source, pil_to_tensor, 16, classnames=names, **kw)
        return Counter(
            (tuple(img.flatten().tolist()), int(label))
            for x, y in loader
            for img, label in zip(x, y, strict=True)
        )

    assert pairs(root) == expected
    assert pairs(str(tmp_path / "shards"), num_workers=2) == expected
    with pytest.raises(ValueError, match="3 class names but 24 class folders"):
        make_labelled_loader(root, pil_to_tensor, 4, classnames=names[:3])
    with pytest.raises(ValueError, match="class names but shard labels"):
        make_labelled_loader(str(tmp_path / "shards"), pil_to_tensor, 4, classnames=names[:3])


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_labelled_rank_split_covers_every_sample_once(tmp_path, kind):
    root = write_labelled_set(
        tmp_path / "val", per_class=3, shard_dir=tmp_path / "shards", samples_per_shard=20
    )
    source = root if kind == "folder" else str(tmp_path / "shards")
    for max_per_class, total in [(None, 72), (2, 48)]:
        seen, counts = Counter(), []
        for rank in range(5):  # 72 and 48 are not multiples of 5
            loader = make_labelled_loader(
                source, pil_to_tensor, 7, rank=rank, world_size=5, max_per_class=max_per_class
            )
            got = [
                (tuple(img.flatten().tolist()), int(label))
                for x, y in loader
                for img, label in zip(x, y, strict=True)
            ]
            assert len(got) == loader.num_samples and loader.total_samples == total
            seen.update(got)
            counts.append(len(got))
        assert sum(seen.values()) == total and len(seen) == total  # disjoint, no padding
        assert max(counts) - min(counts) <= 1
        assert Counter(label for _, label in seen) == Counter({c: max_per_class or 3 for c in range(24)})


def test_labelled_imagenet_folders_and_errors(tmp_path):
    jpg = tiny_jpeg(0)
    wnids = sorted(f"n{i * 7919 % 10**8:08d}" for i in range(1000))
    for w in wnids:
        (tmp_path / "inet" / w).mkdir(parents=True)
        (tmp_path / "inet" / w / "a.JPEG").write_bytes(jpg)
    loader = make_labelled_loader(
        tmp_path / "inet", pil_to_tensor, 500, classnames=load_classnames("imagenet")
    )
    assert loader.classes == wnids and loader.num_classes == 1000
    assert load_classnames("imagenet", loader.num_classes) == list(open_clip.IMAGENET_CLASSNAMES)
    assert torch.cat([y for _, y in loader]).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="1000 class names"):
        load_classnames("imagenet", 10)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable samples"):
        make_labelled_loader(str(tmp_path / "empty.tar"), pil_to_tensor, 4, retry_delay=0.0)


def test_templates(tmp_path):
    assert (
        len(load_templates("openai")) == 80 and load_templates("openai")[0]("dog") == "a bad photo of a dog."
    )
    assert len(load_templates("simple")) == len(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    (tmp_path / "t.txt").write_text("a {}.\n\nthe {} here\n")
    assert load_templates(tmp_path / "t.txt") == ["a {}.", "the {} here"]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError):
        load_classnames(tmp_path / "none.txt")


# ---- retrieval sets ---------------------------------------------------------------------------------


def test_retrieval_set_synthetic_and_caption_formats(tmp_path):
    spec = write_retrieval_set(tmp_path / "r", num_images=12, captions_per_image=5, samples_per_shard=5)
    images, texts, t2i = load_retrieval_set(spec, pil_to_tensor, lambda t: torch.arange(len(t))[:, None])
    assert images.shape == (12, 3, 32, 32) and texts.shape == (60, 1)
    assert t2i.tolist() == [i for i in range(12) for _ in range(5)]
    write_tar(
        tmp_path / "mixed.tar",
        [
            ("a", {"jpg": tiny_jpeg(0), "txt": b"sample 1\nsample 2\n\n"}),
            ("b", {"png": b"\x89PNG broken", "txt": b"sample 3"}),  # undecodable -> skipped with its captions
            ("c", {"jpg": tiny_jpeg(2), "json": json.dumps(["sample 4", "sample 5", "sample 6"]).encode()}),
            ("d", {"jpg": tiny_jpeg(3), "json": json.dumps({"caption": "sample 7"}).encode()}),
            ("e", {"jpg": tiny_jpeg(4)}),
        ],
    )
    images, texts, t2i = load_retrieval_set(str(tmp_path / "mixed.tar"), pil_to_tensor, id_tokenizer)
    assert images.shape[0] == 3
    assert texts[:, 0].tolist() == [1, 2, 4, 5, 6, 7] and t2i.tolist() == [0, 0, 1, 1, 1, 2]
