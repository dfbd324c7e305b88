"""Deterministic synthetic data: procedural scenes (one coloured shape of some size at some position on a
plain background) with varied captions, so the demo and the tests run offline and a small CLIP trained for
a few minutes on CPU learns something measurable (zero-shot accuracy over the colour-shape classes).

Every sample is drawn from its own RNG seeded by (seed, index), so the output is byte-identical for a
given seed and any shard can be regenerated alone. Sets written with different seeds hold different
scenes: `write_demo_data` gives each split (training pairs, evaluation set, MoPE proxy set, and
their retrieval counterparts) its own seed, so what chooses the pruning is never what measures it.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from mope_dist.utils import atomic_dir, atomic_write_json

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.2, "medium": 0.3, "large": 0.42}  # shape radius as a fraction of the image side
BACKGROUNDS = {
    "black": (10, 10, 10),
    "dark gray": (70, 70, 70),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
}
POSITIONS = {  # grid cell (column, row) in a 3x3 layout
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "a photo of a {colour} {shape}",
    "{colour} {shape} on a {background} background",
    "there is a {size} {colour} {shape} near the {position}",
    "a {shape} coloured {colour}",
    "an image showing a {colour} {shape}",
    "{size} {colour} {shape}",
    "a {colour} {shape} at the {position} of a {background} picture",
    "a drawing of a {shape}, it is {colour}",
    "{colour} {shape}",
)
CLASS_TEMPLATES = ("a photo of a {}.", "a {}.", "a drawing of a {}.", "an image showing a {}.", "{}")
CLASSNAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
_SUPERSAMPLE = 4  # draw larger, then downsample: smooth edges at 32 px


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 20) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def render(attrs: dict, rng: random.Random, image_size: int) -> Image.Image:
    """Draw the scene described by attrs (colour, shape, size, position, background)."""
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), _jitter(BACKGROUNDS[attrs["background"]], rng, 8))
    draw = ImageDraw.Draw(img)
    r = SIZES[attrs["size"]] * side * rng.uniform(0.9, 1.1)
    col, row = POSITIONS[attrs["position"]]
    span = side - 2 * r  # centres stay inside the image so the shape is never clipped
    cx = r + span * (col / 2) + rng.uniform(-0.05, 0.05) * span
    cy = r + span * (row / 2) + rng.uniform(-0.05, 0.05) * span
    fill = _jitter(COLOURS[attrs["colour"]], rng)
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def _scene(seed: int, index: int, colour: str | None = None, shape: str | None = None):
    rng = random.Random(f"{seed}:{index}")
    attrs = {
        "colour": colour or rng.choice(list(COLOURS)),
        "shape": shape or rng.choice(SHAPES),
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice(list(BACKGROUNDS)),
    }
    return attrs, rng


def caption(attrs: dict, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(**attrs)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: str | os.PathLike, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write [(key, {ext: bytes})] as a webdataset tar with fixed metadata (byte-identical reruns)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def _write_shards(
    out: Path, records: list[tuple[str, dict[str, bytes]]], samples_per_shard: int
) -> list[str]:
    names, sizes = [], {}
    for i in range(0, len(records), samples_per_shard):
        name = f"{i // samples_per_shard:06d}.tar"
        chunk = records[i : i + samples_per_shard]
        write_tar(out / name, chunk)
        names.append(name)
        sizes[name] = len(chunk)
    atomic_write_json(out / "sizes.json", sizes)
    return names


def _shard_spec(out_dir: Path, names: list[str]) -> str:
    if len(names) == 1:
        return str(out_dir / names[0])
    return str(out_dir / f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar")


def write_image_text_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int = 1000,
    seed: int = 0,
    image_size: int = 32,
    overwrite: bool = False,
) -> str:
    """Write img2dataset-style shards (jpg + txt + json per sample) and sizes.json; return the shard spec."""
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("num_samples and samples_per_shard must be > 0")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        records = []
        for i in range(num_samples):
            attrs, rng = _scene(seed, i)
            text = caption(attrs, rng)
            meta = {"key": f"{i:09d}", "caption": text, "status": "success", **attrs}
            parts = {
                "jpg": _jpeg(render(attrs, rng, image_size)),
                "txt": text.encode(),
                "json": json.dumps(meta).encode(),
            }
            records.append((f"{i:09d}", parts))
        names = _write_shards(tmp, records, samples_per_shard)
    return _shard_spec(out_dir, names)


def write_labelled_set(
    out_dir: str | os.PathLike,
    per_class: int = 10,
    seed: int = 1,
    image_size: int = 32,
    shard_dir: str | os.PathLike | None = None,
    samples_per_shard: int = 100,
    overwrite: bool = False,
) -> Path:
    """Write a zero-shot set over the colour-shape classes in torchvision ImageFolder layout
    (`out_dir/<NNN_colour_shape>/*.jpg`, folders sort in class order) with `classnames.txt` and
    `templates.txt` beside the folders. With `shard_dir`, also write the same samples as shards with a
    `cls` field (class index) for the shard-based labelled loader."""
    out_dir = Path(out_dir)
    records = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for label, name in enumerate(CLASSNAMES):
            colour, shape = name.split(" ")
            folder = tmp / f"{label:03d}_{colour}_{shape}"
            folder.mkdir()
            for k in range(per_class):
                index = label * per_class + k
                attrs, rng = _scene(seed, index, colour=colour, shape=shape)
                data = _jpeg(render(attrs, rng, image_size))
                (folder / f"{k:05d}.jpg").write_bytes(data)
                records.append(
                    (f"{index:09d}", {"jpg": data, "cls": str(label).encode(), "txt": name.encode()})
                )
        (tmp / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
        (tmp / "templates.txt").write_text("\n".join(CLASS_TEMPLATES) + "\n")
    if shard_dir is not None:
        order = random.Random(seed).sample(records, len(records))  # shards mix classes, like real data
        with atomic_dir(shard_dir, overwrite=overwrite) as tmp:
            _write_shards(tmp, order, samples_per_shard)
    return out_dir


def write_retrieval_set(
    out_dir: str | os.PathLike,
    num_images: int = 100,
    captions_per_image: int = 5,
    samples_per_shard: int = 100,
    seed: int = 2,
    image_size: int = 32,
    overwrite: bool = False,
) -> str:
    """Write retrieval shards: per image a jpg, `txt` with one caption per line and `json` {"captions": [...]}.
    Captions of one image are distinct (as far as the templates allow); returns the shard spec."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        records = []
        for i in range(num_images):
            attrs, rng = _scene(seed, i)
            image = _jpeg(render(attrs, rng, image_size))
            templates = rng.sample(CAPTION_TEMPLATES, min(captions_per_image, len(CAPTION_TEMPLATES)))
            texts = [t.format(**attrs) for t in templates]
            texts += [caption(attrs, rng) for _ in range(captions_per_image - len(texts))]
            meta = json.dumps({"key": f"{i:09d}", "captions": texts, **attrs}).encode()
            records.append((f"{i:09d}", {"jpg": image, "txt": "\n".join(texts).encode(), "json": meta}))
        names = _write_shards(tmp, records, samples_per_shard)
    return _shard_spec(out_dir, names)


SPLIT_SEEDS = {"train": 0, "val": 1, "retrieval": 2, "proxy": 3, "retrieval_proxy": 4}  # added to `seed`


def write_demo_data(
    out_dir: str | os.PathLike,
    train_samples: int = 10000,
    samples_per_shard: int = 1000,
    val_per_class: int = 20,
    proxy_per_class: int = 10,
    retrieval_images: int = 200,
    retrieval_proxy_images: int = 100,
    captions_per_image: int = 5,
    image_size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, str]:
    """Every split of the demo under out_dir, each from its own seed (SPLIT_SEEDS): train/ (image-text
    shards), val/ (the zero-shot evaluation set, ImageFolder; val_shards/ the same as shards), proxy/
    (the MoPE classification proxy, ImageFolder, disjoint from val/), retrieval/ (held-out pairs) and
    retrieval_proxy/ (the MoPE retrieval proxy). Returns {split: path or shard spec}."""
    out, common = Path(out_dir), dict(image_size=image_size, overwrite=overwrite)
    seeds = {split: seed + offset for split, offset in SPLIT_SEEDS.items()}
    paths = {
        "train": write_image_text_shards(
            out / "train", train_samples, samples_per_shard, seed=seeds["train"], **common
        ),
        "val": str(
            write_labelled_set(
                out / "val", val_per_class, seed=seeds["val"], shard_dir=out / "val_shards", **common
            )
        ),
        "val_shards": str(out / "val_shards"),
        "proxy": str(write_labelled_set(out / "proxy", proxy_per_class, seed=seeds["proxy"], **common)),
    }
    for split, n in (("retrieval", retrieval_images), ("retrieval_proxy", retrieval_proxy_images)):
        paths[split] = write_retrieval_set(
            out / split, n, captions_per_image, samples_per_shard=100, seed=seeds[split], **common
        )
    return paths
