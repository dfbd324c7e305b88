"""The device input path: uint8 worker transform + device normalisation == open_clip's float pipeline."""

from __future__ import annotations

import io
import random

import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

from mope_dist.data import make_image_text_loader
from mope_dist.data.device import DevicePrefetcher, ImageNormalizer, split_normalize
from mope_dist.data.image_text import decode_image
from mope_dist.data.synthetic import write_image_text_shards

CFG = PreprocessCfg(size=48)  # OpenAI mean/std, bicubic, shortest-side resize


def _jpeg_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Decoded JPEGs of assorted sizes and aspect ratios, larger than the model's side (as in training)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = 60 + 17 * i, 90 - 9 * i
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        out.append(decode_image(buf.getvalue()))
    return out


JITTER = {"color_jitter_prob": 0.5, "color_jitter": (0.4, 0.4, 0.4, 0.1), "gray_scale_prob": 0.3}


# open_clip applies these augmentations and still warns that they are "unused" (it leaves them in its dict)
@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")
@pytest.mark.parametrize("is_train", [True, False])
@pytest.mark.parametrize("aug", [None, JITTER])
def test_uint8_transform_then_normalize_equals_open_clip_float_pipeline(is_train, aug):
    """PIL resizes/crops in uint8 before ToTensor, so nothing is quantised twice: equality is exact."""
    reference = image_transform_v2(CFG, is_train=is_train, aug_cfg=aug)
    uint8_tf, normalize = split_normalize(reference)
    assert normalize.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert normalize.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    for i, img in enumerate(_jpeg_images(4)):
        torch.manual_seed(i), random.seed(i)  # the same random crop / jitter on both sides
        expected = reference(img)
        torch.manual_seed(i), random.seed(i)
        pixels = uint8_tf(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 48, 48)
        got = normalize(pixels[None])[0]
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), (got - expected).abs().max()


def test_normalizer_matches_torchvision_and_casts():
    pixels = torch.randint(
        0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    normalize = ImageNormalizer(mean, std)
    reference = torch.stack([Normalize(mean, std)(ToTensor()(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert torch.equal(normalize(pixels), reference)
    half = normalize(pixels, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, reference.to(torch.bfloat16))
    already = torch.randn(2, 3, 5, 7)  # float batches are already normalised: cast only
    assert torch.equal(normalize(already), already)
    assert torch.equal(normalize(already, torch.bfloat16), already.to(torch.bfloat16))


def test_split_normalize_refuses_other_transforms():
    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        split_normalize(Compose([ToTensor()]))
    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        split_normalize(lambda img: img)


class CountingBatches:
    """A source that records how many batches were taken from it."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.taken += 1
            yield b


def _uint8_batches(n: int, batch: int = 3, side: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=g),
            torch.randint(0, 49408, (batch, 5), generator=g),
        )
        for _ in range(n)
    ]


def test_prefetcher_cpu_normalises_in_order_one_batch_ahead():
    batches = _uint8_batches(4)
    normalize = ImageNormalizer(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    source = CountingBatches(batches)
    got = []
    for i, (images, tokens) in enumerate(DevicePrefetcher(source, "cpu", normalize)):
        assert source.taken == min(i + 2, len(batches))  # the next batch is already taken
        got.append((images, tokens))
    assert len(got) == len(batches)
    for (images, tokens), (raw, raw_tokens) in zip(got, batches, strict=True):
        assert torch.equal(images, normalize(raw)) and torch.equal(tokens, raw_tokens)
    assert list(DevicePrefetcher([], "cpu", normalize)) == []


def test_prefetcher_float_batches_and_missing_normalizer():
    floats = [(torch.randn(2, 3, 4, 4), torch.ones(2, 5, dtype=torch.long)) for _ in range(2)]
    got = list(DevicePrefetcher(floats, "cpu", dtype=torch.bfloat16))
    assert all(torch.equal(a, b.to(torch.bfloat16)) for (a, _), (b, _) in zip(got, floats, strict=True))
    with pytest.raises(ValueError, match="uint8 image batch"):
        list(DevicePrefetcher(_uint8_batches(1), "cpu"))


def test_loader_uint8_batches_through_prefetcher_equal_float_loader(tmp_path):
    """End to end over shards: the job's loader with the uint8 transform, normalised by the prefetcher,
    gives the same tensors as the same loader with open_clip's float transform (same seeds)."""
    shards = write_image_text_shards(tmp_path / "shards", 12, 6, image_size=40)
    float_tf = image_transform_v2(PreprocessCfg(size=32), is_train=True)
    uint8_tf, normalize = split_normalize(float_tf)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def loader(transform):
        torch.manual_seed(7)  # the random crops (workers=0: drawn in this process, in sample order)
        return make_image_text_loader(shards, transform, tokenizer, 4, num_workers=0, mode="finite", seed=3)

    expected = list(loader(float_tf))
    raw = loader(uint8_tf)
    got = list(DevicePrefetcher(raw, "cpu", normalize))
    assert len(got) == len(expected) == 3
    for (images, tokens), (ref_images, ref_tokens) in zip(got, expected, strict=True):
        assert torch.equal(images, ref_images) and torch.equal(tokens, ref_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pin", [False, True])
def test_prefetcher_cuda_side_stream(pin):
    """Copies on the side stream while the consuming stream is busy: values must still be those of the
    CPU normalisation, and the consumer's in-place edits must not reach the next batches."""
    batches = _uint8_batches(6, batch=8, side=64, seed=2)
    if pin:
        batches = [(a.pin_memory(), b.pin_memory()) for a, b in batches]
    normalize = ImageNormalizer(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    reference = [(normalize(a), b) for a, b in batches]
    for dtype in (torch.float32, torch.bfloat16):
        got = []
        for images, tokens in DevicePrefetcher(batches, "cuda", normalize, dtype):
            torch.cuda._sleep(20_000_000)  # keep the consuming stream busy while the next copy runs
            got.append((images.clone(), tokens.clone()))
            images.mul_(0), tokens.mul_(0)  # the consumer owns its batch
        torch.cuda.synchronize()
        assert len(got) == len(batches)
        for (images, tokens), (ref, ref_tokens) in zip(got, reference, strict=True):
            assert images.dtype == dtype and images.is_cuda
            torch.testing.assert_close(
                images.cpu(), ref.to(dtype), rtol=0, atol=1e-6 if dtype == torch.float32 else 0
            )
            assert torch.equal(tokens.cpu(), ref_tokens)


# ----------------------------------------------------------------------------------------------------
# data.decode=device: JPEG headers and crops in the workers, decoding and resizing on the device


def _encoded(n: int, seed: int = 0) -> list[bytes]:
    """JPEG bytes of assorted sizes (one grayscale), one PNG, one CMYK JPEG: the last two take the CPU path."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = 60 + 17 * i, 90 - 9 * i
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    for mode, fmt in (("RGB", "PNG"), ("CMYK", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def test_device_decode_matches_the_worker_path():
    """Same crops (same RNG calls) as open_clip's RandomResizedCrop; pixels within resampling noise of
    PIL's (PIL decodes and resizes in uint8 fixed point, the device path in float); the images that
    are not plain JPEGs, or carry bytes after their end marker, are the CPU path's exactly; decoding in
    chunks changes nothing."""
    from mope_dist.data.device import JpegBatch, collate_images, split_decode

    uint8_tf, normalize = split_normalize(image_transform_v2(CFG, is_train=True))
    crops, decoder = split_decode(uint8_tf)
    encoded = _encoded(5)
    encoded.append(encoded[3] + b"\x00" * 100)  # trailing bytes (camera JPEGs): valid, decoded by PIL
    torch.manual_seed(0)
    expected = torch.stack([uint8_tf(decode_image(e)) for e in encoded])
    torch.manual_seed(0)
    batch = collate_images([crops(e) for e in encoded])
    assert isinstance(batch, JpegBatch) and len(batch) == 8 and batch.boxes[:, 0].tolist()[5:] == [-1] * 3
    normalize.decoder = decoder
    (got, tokens), *_ = DevicePrefetcher([(batch, torch.zeros(8, 4, dtype=torch.long))], "cpu", normalize)
    reference = normalize(expected)
    assert got.shape == reference.shape == (8, 3, 48, 48) and got.dtype == torch.float32
    assert torch.equal(got[5:], reference[5:])  # PNG, CMYK, trailing bytes: decoded in the worker
    whole, stand_ins = decoder(batch, torch.device("cpu"))
    decoder.chunk = 2  # the 5 JPEGs in three batched decodes
    assert torch.equal(decoder(batch, torch.device("cpu"))[0], whole) and stand_ins is None
    diff = (whole.float() - expected.float()).abs()
    # measured: mean 0.11, max 9 levels (grayscale JPEG -> RGB included)
    assert diff[:5].mean() < 0.5 and diff[:5].max() <= 12, (diff.mean(), diff.max())


def test_device_decode_refuses_truncated_jpegs_and_other_transforms():
    from mope_dist.data.device import split_decode

    crops, _ = split_decode(split_normalize(image_transform_v2(CFG, is_train=True))[0])
    with pytest.raises(OSError, match="truncated"):  # decoded on the CPU, which refuses it
        crops(_encoded(1)[0][:-200])
    for is_train, aug in ((False, None), (True, JITTER)):
        uint8_tf = split_normalize(image_transform_v2(CFG, is_train=is_train, aug_cfg=aug))[0]
        with pytest.raises(ValueError, match="decoding on the device needs open_clip's default train"):
            split_decode(uint8_tf)


def test_device_decode_replaces_an_undecodable_jpeg():
    """A JPEG whose header and end marker look right but whose data is garbage: decoded neither on the
    device nor on the CPU, another sample of the batch stands in, its caption with it, counted."""
    from mope_dist.data.device import collate_images, split_decode

    crops, decoder = split_decode(split_normalize(image_transform_v2(CFG, is_train=True))[0])
    good = _encoded(1)[0]
    header = good.index(b"\xff\xda")  # start of scan: keep the headers, garble the entropy-coded data
    bad = good[: header + 2] + b"\x00\x07" + b"\xff" * 300 + b"\xff\xd9"
    batch = collate_images([crops(good), crops(bad), crops(good)])
    normalize = split_normalize(image_transform_v2(CFG, is_train=True))[1]
    normalize.decoder = decoder
    tokens = torch.tensor([[10], [11], [12]])
    reported = []
    decoder.on_replaced = reported.append  # the job's loader counts it (count_unusable)
    (images, got_tokens), *_ = DevicePrefetcher([(batch, tokens)], "cpu", normalize)
    assert decoder.replaced == 1 and reported == ["bad_image"] and torch.equal(images[1], images[0])
    assert got_tokens.flatten().tolist() == [10, 10, 12]  # the image's own caption, not the bad one's


def test_loader_with_device_decode_yields_jpeg_batches(tmp_path):
    """Through the job's loader (2 workers): JpegBatches whose decoded images are the worker path's up to
    resampling noise, in the same order."""
    from mope_dist.data.device import JpegBatch, split_decode

    shards = write_image_text_shards(tmp_path / "shards", 16, 8, image_size=40)
    uint8_tf, normalize = split_normalize(image_transform_v2(PreprocessCfg(size=32), is_train=True))
    crops, normalize.decoder = split_decode(uint8_tf)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def batches(transform):
        loader = make_image_text_loader(shards, transform, tokenizer, 4, num_workers=2, mode="finite", seed=3)
        torch.manual_seed(7)  # the workers' seeds, so both sides draw the same crops
        return list(loader), loader

    (raw, loader), (plain, _) = batches(crops), batches(uint8_tf)
    assert all(isinstance(images, JpegBatch) for images, _ in raw) and len(raw) == len(plain) == 4
    got = list(DevicePrefetcher(raw, "cpu", normalize))
    for (images, tokens), (ref_images, ref_tokens) in zip(got, plain, strict=True):
        assert torch.equal(tokens, ref_tokens)  # the same samples in the same order
        diff = (images - normalize(ref_images)).abs() * 255 * 0.27  # ~ in uint8 levels (std ~0.27)
        assert diff.mean() < 0.1, diff.mean()  # other crops would differ by ~10 levels
    assert loader.skipped().get("bad_image", 0) == 0
    loader.count_unusable("bad_image")  # what the decoder reports: counted with the workers' skips
    assert loader.skipped()["bad_image"] == 1 and loader.sample_counts()["skipped"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_decode_on_cuda_matches_cpu():
    """nvJPEG + CUDA resampling vs the same path on the CPU (libjpeg-turbo): IDCT rounding apart, equal."""
    from mope_dist.data.device import collate_images, split_decode

    crops, decoder = split_decode(split_normalize(image_transform_v2(CFG, is_train=True))[0])
    batch = collate_images([crops(e) for e in _encoded(5)])
    (got, _), (ref, _) = (
        decoder(batch.pin_memory(), torch.device("cuda")),
        decoder(batch, torch.device("cpu")),
    )
    assert got.is_cuda and decoder.replaced == 0
    diff = (got.cpu().float() - ref.float()).abs()
    assert diff.mean() < 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
