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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor


class ImageNormalizer:
    """uint8 images [B,3,H,W] -> (x / 255 - mean) / std as `dtype`; float images pass through (cast only).

    Float batches come from open_clip's own float transform or from in-memory benchmarks and are
    already normalised, so both kinds of loader work with the same training loop."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
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
            tokens = tokens.to(self.device)
            return (self._prepare(images.to(self.device)), tokens, *rest), None
        with torch.cuda.stream(self.stream):
            images = _pinned(images).to(self.device, non_blocking=True)
            tokens = _pinned(tokens).to(self.device, non_blocking=True)
            images = self._prepare(images)
            copied = self.stream.record_event()
        return (images, tokens, *rest), copied

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            return self.normalize(images, self.dtype)
        if images.dtype == torch.uint8:
            raise ValueError("uint8 image batch but no normalize given (see split_normalize)")
        return images.to(self.dtype)
