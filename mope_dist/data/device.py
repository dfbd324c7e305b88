"""The device end of the input path: uint8 images out of the workers, normalised on the device.

A float32 batch of 256 x 3 x 224 x 224 is 154 MB: it costs the workers' shared memory, the pin-memory
thread and the host-to-device copy four times what the same pixels cost as uint8. So the workers run
open_clip's transform without its last two steps (ToTensor, Normalize) and hand over uint8 tensors
(`split_normalize`), and `DevicePrefetcher` copies each batch to the device on a side CUDA stream
one batch ahead of the step that uses it, then normalises it there with `ImageNormalizer`.

open_clip's transforms resize and crop PIL images, whose pixels are uint8, before ToTensor: dropping
ToTensor and Normalize loses nothing, and the normalisation here repeats ToTensor's and Normalize's
float32 arithmetic operation for operation, so on the CPU the result equals open_clip's float
pipeline bit for bit (tests/test_device_input.py); on the GPU it is the same arithmetic in CUDA.

`data.decode: device` moves JPEG decoding off the CPU cores as well (`split_decode`): the workers read
each JPEG's header only, draw its random crop exactly as open_clip's RandomResizedCrop would (same
RNG calls, so the same boxes), and hand over the encoded bytes (`JpegBatch`); the prefetcher decodes
the batch with torchvision's batched `decode_jpeg` on the device (nvJPEG on a GPU), then crops and
resizes each image there (`JpegDecoder`). Images that are not plain RGB/grayscale JPEGs take the CPU
path in the worker, and a JPEG the device cannot decode is decoded on the CPU.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torchvision.transforms import Compose, Normalize, PILToTensor, RandomResizedCrop, ToTensor

from mope_dist.utils import get_logger

log = get_logger("mope_dist.data")


class ImageNormalizer:
    """uint8 images [B,3,H,W] -> (x / 255 - mean) / std as `dtype`; float images pass through (cast only).

    Float batches come from open_clip's own float transform or from in-memory benchmarks and are
    already normalised, so both kinds of loader work with the same training loop."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.decoder: JpegDecoder | None = None  # data.decode=device: JpegBatch -> uint8 on the device
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._stats[device] = mean, std
        return self._stats[device]

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images.to(dtype)
        mean, std = self._on(images.device)
        # torchvision's ToTensor (`.float().div(255)`) then Normalize (`sub_(mean).div_(std)`)
        out = images.to(torch.float32).div(255).sub_(mean).div_(std)
        return out.to(dtype)

    def __repr__(self) -> str:
        return f"ImageNormalizer(mean={self.mean}, std={self.std})"


def split_normalize(transform: Compose) -> tuple[Compose, ImageNormalizer]:
    """open_clip's image transform (train or val) -> (the same transform ending in a uint8 tensor, its
    normalisation for the device).

    The transform must end with ToTensor (open_clip's MaybeToTensor is one) and Normalize, as the
    transforms of `open_clip.image_transform(_v2)` without `use_timm` do; anything else is refused."""
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        names = [type(s).__name__ for s in steps] or [type(transform).__name__]
        raise ValueError(
            f"cannot split a uint8 transform from {names}: expected a Compose ending in ToTensor, Normalize "
            "(open_clip's image transforms without use_timm)"
        )
    normalize = steps[-1]
    return Compose([*steps[:-2], PILToTensor()]), ImageNormalizer(normalize.mean, normalize.std)


class EncodedJpeg:
    """One JPEG as the worker hands it over: its bytes and its crop box (top, left, height, width)."""

    __slots__ = ("data", "box")

    def __init__(self, data: torch.Tensor, box: tuple[int, int, int, int]):
        self.data, self.box = data, box


class JpegBatch:
    """A batch of images, in batch order, to be decoded on the device: the JPEGs' bytes concatenated
    (`data`, `offsets`), each one's crop box (`boxes`, -1 for images decoded already), and the images
    the worker decoded itself (`decoded`, uint8 [k, 3, H, W])."""

    def __init__(self, data, offsets, boxes, decoded):
        self.data, self.offsets, self.boxes, self.decoded = data, offsets, boxes, decoded

    @classmethod
    def of(cls, images: list) -> JpegBatch:
        jpegs = [x for x in images if isinstance(x, EncodedJpeg)]
        sizes = torch.tensor([0] + [x.data.numel() for x in jpegs], dtype=torch.int64)
        boxes = torch.tensor([x.box if isinstance(x, EncodedJpeg) else (-1,) * 4 for x in images])
        decoded = [x for x in images if not isinstance(x, EncodedJpeg)]
        return cls(
            torch.cat([x.data for x in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8),
            sizes.cumsum(0),
            boxes,
            torch.stack(decoded) if decoded else torch.empty(0, dtype=torch.uint8),
        )

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def pin_memory(self) -> JpegBatch:  # called by the DataLoader's pin-memory thread
        return JpegBatch(self.data.pin_memory(), self.offsets, self.boxes, self.decoded.pin_memory())

    def jpegs(self) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
        """(batch index, encoded bytes, crop box) of each JPEG."""
        k = 0
        for i, box in enumerate(self.boxes.tolist()):
            if box[0] >= 0:
                yield i, self.data[self.offsets[k] : self.offsets[k + 1]], box
                k += 1


def collate_images(images: list) -> torch.Tensor | JpegBatch:
    """The workers' images of one batch: stacked, or a JpegBatch when some are still encoded."""
    if any(isinstance(x, EncodedJpeg) for x in images):
        return JpegBatch.of(images)
    return torch.stack(images)


class JpegCrops:
    """Worker side of data.decode=device: the sample's encoded image -> EncodedJpeg (header read, crop
    drawn) for RGB or grayscale JPEGs that end in their end-of-image marker, else the CPU transform's
    uint8 tensor. A JPEG with bytes after that marker (common from cameras) or none (truncated: the
    GPU decoder could return a partly grey image without an error) takes the CPU path, which decodes
    the first and raises on the second, so the loader skips and counts it as a bad image, as it does
    with data.decode=workers."""

    encoded = True  # the loader passes the image field as it is, not decoded

    def __init__(self, crop: RandomResizedCrop, cpu_transform: Compose):
        self.crop, self.cpu_transform = crop, cpu_transform

    def __call__(self, value):
        from PIL import Image

        from mope_dist.data.samples import decode_image

        if isinstance(value, bytes) and value[:3] == b"\xff\xd8\xff":
            header = Image.open(io.BytesIO(value))  # reads the header, decodes nothing
            if header.format == "JPEG" and header.mode in ("RGB", "L") and value.endswith(b"\xff\xd9"):
                box = self.crop.get_params(header, list(self.crop.scale), list(self.crop.ratio))
                return EncodedJpeg(torch.frombuffer(bytearray(value), dtype=torch.uint8), tuple(box))
        return self.cpu_transform(decode_image(value))


class JpegDecoder:
    """Device side of data.decode=device: a JpegBatch -> (uint8 [B, 3, H, W] on `device`, stand-ins).
    The JPEGs are decoded in batched calls of `chunk` images (full-size decoded images are large: the
    chunk bounds their memory), then each is cropped and resized (antialiased, the transform's
    interpolation) on the device; a JPEG that fails there is decoded on the CPU, and one that fails
    there too is replaced by another sample of its batch (counted in `replaced`, logged, and passed to
    `on_replaced`, e.g. the loader's count_unusable): stand-ins is then the row each row's sample
    comes from, for the captions to follow (else None)."""

    def __init__(self, crop: RandomResizedCrop, chunk: int = 64):
        self.size, self.interpolation, self.chunk = list(crop.size), crop.interpolation, chunk
        self.replaced = 0
        self.on_replaced: Callable[[str], None] | None = None  # called with "bad_image"

    def __call__(self, batch: JpegBatch, device: torch.device) -> tuple[torch.Tensor, list[int] | None]:
        from torchvision.transforms.v2.functional import resized_crop

        out = torch.empty(len(batch), 3, *self.size, dtype=torch.uint8, device=device)
        ready = (batch.boxes[:, 0] < 0).nonzero().flatten().tolist()
        if ready:
            out[ready] = batch.decoded.to(device, non_blocking=True)
        jpegs, missing = list(batch.jpegs()), []
        for start in range(0, len(jpegs), self.chunk):
            part = jpegs[start : start + self.chunk]
            images = self._decode([data for _, data, _ in part], device)
            for (row, _, box), image in zip(part, images, strict=True):  # box: top, left, height, width
                if image is None:
                    missing.append(row)
                    continue
                out[row] = resized_crop(
                    image, *box, self.size, interpolation=self.interpolation, antialias=True
                )
        if not missing:
            return out, None
        good = [r for r in range(len(batch)) if r not in missing]
        if not good:  # nothing decodable in the whole batch: black images
            out.zero_()
            return out, None
        out[missing] = out[good[0]].clone()  # another sample of the batch stands in, caption included
        return out, [good[0] if r in missing else r for r in range(len(batch))]

    def _decode(self, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not datas:
            return []
        _settle(device)
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the batched call: one at a time, the CPU as fallback
            _settle(device)
            out = []
            for data in datas:
                image = None
                for where in dict.fromkeys((device, torch.device("cpu"))):
                    try:
                        image = decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device)
                        break
                    except RuntimeError:
                        continue
                if image is None:
                    self.replaced += 1
                    if self.on_replaced is not None:
                        self.on_replaced("bad_image")
                    log.warning(
                        f"a JPEG that could not be decoded (on {device}, then on the CPU) was replaced by "
                        f"another image of its batch ({self.replaced} so far)"
                    )
                out.append(image)
            return out


def _settle(device: torch.device) -> None:
    """Before torchvision decodes JPEGs on a GPU: it allocates the decoded images on the current stream
    but writes them from its own stream without waiting for this one, so memory freed here with
    kernels still queued (a previous chunk's images) must be idle on the GPU first. Costs little: the
    decode itself ends in a host sync."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def split_decode(transform: Compose) -> tuple[JpegCrops, JpegDecoder]:
    """The uint8 transform of `split_normalize` -> (the workers' JpegCrops, the device's JpegDecoder).

    Only open_clip's default train transform can be split there (RandomResizedCrop, then the RGB
    conversion and the uint8 tensor): its crop needs nothing but the image size. Anything else
    (augmentations, a Resize + CenterCrop eval transform) is refused."""
    steps = list(transform.transforms)
    names = [type(s).__name__ for s in steps]
    expected_rest = ["MaybeConvertMode", "PILToTensor"]
    if len(steps) != 3 or not isinstance(steps[0], RandomResizedCrop) or names[1:] != expected_rest:
        raise ValueError(
            f"decoding on the device needs open_clip's default train transform (RandomResizedCrop, "
            f"MaybeConvertMode, then the uint8 tensor), got {names}"
        )
    return JpegCrops(steps[0], transform), JpegDecoder(steps[0])


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy unless already pinned (pass pin_memory=True to the DataLoader to pin in its
    thread instead of here); from pageable memory a `non_blocking` copy would block the host."""
    return t if t.is_pinned() else t.pin_memory()


class DevicePrefetcher:
    """Iterate over (images, tokens, ...) batches from `batches`, yielding them on `device` with the images
    normalised to `dtype`, the next batch already on its way while the caller works on the current one.

    CUDA: batch n+1 is taken from the loader, pinned if need be, copied `non_blocking` and normalised
    on a side stream before batch n is handed out; the consuming stream waits for batch n's copy on
    the GPU (an event, no host sync), and `record_stream` keeps the caching allocator from handing
    batch n's memory to the side stream while the consuming stream still reads it. So the copy and
    the normalisation overlap the step. Batches already on the device are only cast/normalised, on
    the current stream.
    CPU: the same order of calls (the loader is always one batch ahead of the caller), with no copy.
    Without `normalize`, batches must hold float images (already normalised): uint8 ones are refused.
    """

    def __init__(
        self,
        batches: Iterable,
        device: torch.device | str,
        normalize: ImageNormalizer | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.batches = batches
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.normalize = normalize
        self.dtype = dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __iter__(self) -> Iterator[tuple]:
        source = iter(self.batches)
        pending = self._issue(next(source, None))
        while pending is not None:
            (images, tokens, *rest), copied = pending
            if copied is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(copied)
                images.record_stream(consumer)
                tokens.record_stream(consumer)
            pending = self._issue(next(source, None))
            yield images, tokens, *rest

    def _issue(self, batch) -> tuple[tuple, torch.cuda.Event | None] | None:
        """Start moving one batch (images, tokens, *anything else, passed through) to the device;
        -> (the batch on the device, the event marking the copy's end)."""
        if batch is None:
            return None
        images, tokens, *rest = batch
        if self.stream is None or images.device == self.device:
            return (*self._prepare(images, tokens.to(self.device)), *rest), None
        with torch.cuda.stream(self.stream):
            if not isinstance(images, JpegBatch):  # (JPEGs are read from host memory by the decoder)
                images = _pinned(images).to(self.device, non_blocking=True)
            tokens = _pinned(tokens).to(self.device, non_blocking=True)
            images, tokens = self._prepare(images, tokens)
            copied = self.stream.record_event()
        return (images, tokens, *rest), copied

    def _prepare(
        self, images: torch.Tensor | JpegBatch, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, JpegBatch):
            if self.normalize is None or self.normalize.decoder is None:
                raise ValueError("encoded JPEG batch but no decoder given (see split_decode)")
            images, stand_ins = self.normalize.decoder(images, self.device)
            if stand_ins is not None:
                tokens = tokens[stand_ins]
        images = images.to(self.device)
        if self.normalize is not None:
            return self.normalize(images, self.dtype), tokens
        if images.dtype == torch.uint8:
            raise ValueError("uint8 image batch but no normalize given (see split_normalize)")
        return images.to(self.dtype), tokens
