"""Tests for pbe.images: CLIP preprocessing, image/mask preparation, postprocessing, padding and paste-back.

Reference comparisons use transformers' PIL-backend CLIP processor and diffusers' Paint-by-Example helpers; the rest
checks properties without a reference.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch

from pbe.images import (
    CLIP_MEAN,
    CLIP_STD,
    crop,
    load_image,
    pad_to_multiple,
    paste_back,
    prepare_image_and_mask,
    preprocess_example,
    read_repaint_mask,
    to_8bit,
    to_numpy,
    to_pil,
    upright,
)

# The official feature_extractor/preprocessor_config.json of Fantasy-Studio/Paint-by-Example.
OFFICIAL_CLIP_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def random_image(mode: str, width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A PIL image of the given mode filled with random pixels."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":  # Pillow's own scale for "F": 0..255 (what convert("F") of an 8-bit image makes)
        return PIL.Image.fromarray(rng.uniform(0, 255, (height, width)).astype(np.float32))
    if mode in ("L", "P", "1"):
        gray = PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        return gray if mode == "L" else gray.convert(mode)
    bands = len(PIL.Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    return PIL.Image.frombytes(mode, (width, height), data.tobytes())


@pytest.fixture(scope="module")
def clip_reference():
    """transformers' PIL-backend CLIP processor with the official config (independent of torchvision)."""
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:  # transformers 4: the slow processor is the PIL one
        return transformers.CLIPImageProcessor(**OFFICIAL_CLIP_CONFIG)
    return processor_class(**OFFICIAL_CLIP_CONFIG)


def clip_reference_pixels(processor, images) -> torch.Tensor:
    return processor(images=images, return_tensors="pt").pixel_values


@pytest.fixture(scope="module")
def diffusers_prepare():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated.paint_by_example.pipeline_paint_by_example import (
        prepare_mask_and_masked_image,
    )

    return prepare_mask_and_masked_image


# --------------------------------------------------------------------------------------------------------------------
# preprocess_example
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height",
    [(1, 1), (3, 500), (500, 3), (224, 224), (225, 301), (301, 225), (640, 480), (37, 1000), (223, 223), (2, 3)],
)
def test_clip_parity_sizes(clip_reference, width, height):
    image = random_image("RGB", width, height, seed=width * 1000 + height)
    expected = clip_reference_pixels(clip_reference, image)
    actual = preprocess_example(image)
    assert actual.shape == (1, 3, 224, 224) and actual.dtype == torch.float32
    assert (actual - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA", "PA", "F", "1", "YCbCr", "RGBX"])
@pytest.mark.parametrize("width, height", [(225, 301), (37, 100)])
def test_clip_parity_modes(clip_reference, mode, width, height):
    image = random_image(mode, width, height, seed=7)
    expected = clip_reference_pixels(clip_reference, image)
    assert (preprocess_example(image) - expected).abs().max().item() <= 1e-6


def sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """The expected 8-bit reading of 16-bit values: nearest of the 256 levels v * 257."""
    return np.round(values.astype(np.float64) / 257).astype(np.uint8)


def wide_examples() -> list[tuple[str, object, np.ndarray]]:
    """(label, wide image, its expected 8-bit greyscale) for every wide format; the reference clips them all."""
    rng = np.random.default_rng(11)
    sixteen = rng.integers(0, 65536, (61, 47), dtype=np.uint16)
    unit = rng.uniform(0, 1, (61, 47)).astype(np.float32)
    eight_from_unit = np.round(unit.astype(np.float64) * 255).astype(np.uint8)
    return [
        ("I;16", PIL.Image.fromarray(sixteen), sixteen_to_eight(sixteen)),
        ("I;16B", PIL.Image.fromarray(sixteen).convert("I").convert("I;16B"), sixteen_to_eight(sixteen)),
        ("I", PIL.Image.fromarray(sixteen.astype(np.int32)), sixteen_to_eight(sixteen)),
        ("F in [0, 1]", PIL.Image.fromarray(unit), eight_from_unit),
        ("uint16 array", sixteen, sixteen_to_eight(sixteen)),
        ("float array", unit, eight_from_unit),
    ]


@pytest.mark.parametrize("label, wide, eight", wide_examples(), ids=[case[0] for case in wide_examples()])
def test_clip_wide_images_scaled_not_clipped(clip_reference, label, wide, eight):
    if isinstance(wide, PIL.Image.Image):
        assert wide.mode == label.split()[0]
    # The reference, given the correct 8-bit image, is what pbe must produce from the wide one.
    expected = clip_reference_pixels(clip_reference, PIL.Image.fromarray(eight))
    assert (preprocess_example(wide) - expected).abs().max().item() <= 1e-6


def test_clip_parity_palette_with_transparency(clip_reference):
    image = random_image("P", 90, 60)
    image.info["transparency"] = 17  # one palette index is transparent: composited onto white
    expected = clip_reference_pixels(clip_reference, image)
    assert (preprocess_example(image) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(50, 60, 3), (50, 60, 4), (50, 60, 1)])
def test_clip_parity_numpy(clip_reference, shape):
    array = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    expected = clip_reference_pixels(clip_reference, array)
    assert (preprocess_example(array) - expected).abs().max().item() <= 1e-6


def test_clip_parity_list_and_other_size(clip_reference):
    images = [random_image("RGB", 300, 200, seed=1), random_image("RGBA", 120, 333, seed=2)]
    expected = clip_reference_pixels(clip_reference, images)
    actual = preprocess_example(images)
    assert actual.shape == (2, 3, 224, 224)
    assert (actual - expected).abs().max().item() <= 1e-6

    processor_class = type(clip_reference)
    small = processor_class(**{**OFFICIAL_CLIP_CONFIG, "size": 64, "crop_size": 64})
    expected_small = clip_reference_pixels(small, images)
    assert (preprocess_example(images, size=64) - expected_small).abs().max().item() <= 1e-6


def test_clip_constant_colour_without_reference():
    image = PIL.Image.new("RGB", (300, 170), (10, 128, 250))
    pixels = preprocess_example(image)
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[0], expected.view(3, 1, 1).expand(3, 224, 224), atol=1e-6)
    # Full transparency becomes white, as in CLIP's processor.
    transparent = PIL.Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(preprocess_example(transparent)[0, :, 5, 5], white, atol=1e-6)


def test_clip_tensor_passthrough():
    pixels = torch.randn(3, 224, 224, dtype=torch.float64)
    out = preprocess_example(pixels)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out[0], pixels.float())
    batch = torch.randn(2, 3, 64, 64)
    assert preprocess_example(batch, size=64) is batch


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.randn(3, 200, 200), ValueError),
        (torch.randn(2, 4, 224, 224), ValueError),
        (torch.full((1, 3, 224, 224), float("nan")), ValueError),
        (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), TypeError),
        ("example.png", TypeError),
        ([], ValueError),
        ([PIL.Image.new("RGB", (8, 8)), "x"], TypeError),
        (np.zeros((8, 8, 3), dtype=np.int64), TypeError),
        (np.full((8, 8, 3), 2.0, dtype=np.float32), ValueError),
        (PIL.Image.fromarray(np.full((8, 8), -1.0, dtype=np.float32)), ValueError),
        (np.zeros((8, 8, 5), dtype=np.uint8), ValueError),
        (np.zeros((8,), dtype=np.uint8), ValueError),
    ],
)
def test_clip_errors_name_the_argument(bad, error):
    with pytest.raises(error, match="example_image"):
        preprocess_example(bad)


# --------------------------------------------------------------------------------------------------------------------
# prepare_image_and_mask
# --------------------------------------------------------------------------------------------------------------------


def random_mask(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """An "L" mask with values around the 0.5 threshold (127, 128) as well as 0 and 255."""
    rng = np.random.default_rng(seed)
    values = np.array([0, 1, 126, 127, 128, 129, 254, 255], dtype=np.uint8)
    return PIL.Image.fromarray(values[rng.integers(0, len(values), (height, width))])


def assert_matches_diffusers(reference_out, keep_mask, image):
    reference_mask, reference_masked = reference_out
    assert keep_mask.dtype == torch.float32 and image.dtype == torch.float32
    assert keep_mask.ndim == 4 and keep_mask.shape[1] == 1 and image.shape[1] == 3
    assert set(keep_mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(keep_mask, reference_mask.to(torch.float32).expand_as(keep_mask))
    assert torch.equal(image * keep_mask, reference_masked.to(torch.float32))


def test_prepare_parity_pil(diffusers_prepare):
    image, mask = random_image("RGB", 48, 40, seed=1), random_mask(48, 40, seed=2)
    keep_mask, pixels = prepare_image_and_mask(image, mask)
    assert pixels.shape == (1, 3, 40, 48) and keep_mask.shape == (1, 1, 40, 48)
    assert_matches_diffusers(diffusers_prepare(image, mask), keep_mask, pixels)


@pytest.mark.parametrize("image_mode, mask_mode", [("RGBA", "RGB"), ("L", "1"), ("P", "LA"), ("CMYK", "L")])
def test_prepare_parity_pil_modes(diffusers_prepare, image_mode, mask_mode):
    image = random_image(image_mode, 24, 16, seed=3)
    mask = random_mask(24, 16, seed=4).convert(mask_mode)
    assert_matches_diffusers(diffusers_prepare(image, mask), *prepare_image_and_mask(image, mask))


def test_prepare_parity_pil_lists(diffusers_prepare):
    images = [random_image("RGB", 32, 24, seed=s) for s in range(3)]
    masks = [random_mask(32, 24, seed=10 + s) for s in range(3)]
    keep_mask, pixels = prepare_image_and_mask(images, masks)
    assert pixels.shape == (3, 3, 24, 32) and keep_mask.shape == (3, 1, 24, 32)
    assert_matches_diffusers(diffusers_prepare(images, masks), keep_mask, pixels)
    # One mask for a batch of images: diffusers broadcasts it, we expand it to the batch.
    keep_mask, pixels = prepare_image_and_mask(images, masks[0])
    assert keep_mask.shape == (3, 1, 24, 32)
    assert_matches_diffusers(diffusers_prepare(images, masks[0]), keep_mask, pixels)


@pytest.mark.parametrize(
    "image_shape, mask_shape",
    [
        ((3, 16, 24), (16, 24)),
        ((3, 16, 24), (1, 16, 24)),
        ((3, 16, 24), (1, 1, 16, 24)),
        ((1, 3, 16, 24), (16, 24)),
        ((2, 3, 16, 24), (2, 16, 24)),
        ((2, 3, 16, 24), (2, 1, 16, 24)),
        ((1, 3, 16, 24), (1, 16, 24)),
    ],
)
def test_prepare_parity_tensors(diffusers_prepare, image_shape, mask_shape):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(image_shape, generator=generator) * 2 - 1
    levels = torch.tensor([0.0, 0.25, 0.4999999, 0.5, 0.5000001, 0.75, 1.0])
    mask = levels[torch.randint(0, len(levels), mask_shape, generator=generator)]
    reference = diffusers_prepare(image.clone(), mask.clone())
    assert_matches_diffusers(reference, *prepare_image_and_mask(image, mask))


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_prepare_parity_tensor_dtypes(diffusers_prepare, mask_dtype):
    image = torch.linspace(-1, 1, 3 * 8 * 8, dtype=torch.float64).view(3, 8, 8)
    mask = torch.tensor([0.5, 0.5 + 1e-12, 0.5 - 1e-12, 0.49951171875, 0.500488281, 0.0, 1.0, 0.3]).repeat(8, 1)
    mask = mask.to(mask_dtype)
    reference = diffusers_prepare(image.clone(), mask.clone())
    assert_matches_diffusers(reference, *prepare_image_and_mask(image, mask))


def test_prepare_single_tensor_mask_for_batch():
    image = torch.zeros(3, 3, 8, 8)
    mask = torch.zeros(8, 8)
    mask[2:5, 2:5] = 1
    keep_mask, _ = prepare_image_and_mask(image, mask)
    assert keep_mask.shape == (3, 1, 8, 8)
    assert torch.equal(keep_mask, (1 - mask).expand(3, 1, 8, 8))


def test_prepare_semantics_without_reference():
    image = PIL.Image.new("RGB", (8, 8), (0, 255, 51))
    mask = PIL.Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))  # white = repaint the left half
    keep_mask, pixels = prepare_image_and_mask(image, mask)
    assert torch.equal(pixels[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert keep_mask[0, 0, :, :4].eq(0).all() and keep_mask[0, 0, :, 4:].eq(1).all()


def test_prepare_numpy_equals_pil():
    image, mask = random_image("RGB", 20, 12, seed=5), random_mask(20, 12, seed=6)
    keep_pil, pixels_pil = prepare_image_and_mask(image, mask)
    keep_np, pixels_np = prepare_image_and_mask(np.asarray(image), np.asarray(mask))
    assert torch.equal(keep_pil, keep_np) and torch.equal(pixels_pil, pixels_np)
    # float masks in [0, 1] and bool masks mean the same as their uint8 counterparts
    float_mask = (np.asarray(mask) > 127).astype(np.float64)
    keep_float, _ = prepare_image_and_mask(np.asarray(image), float_mask)
    keep_bool, _ = prepare_image_and_mask(np.asarray(image), float_mask.astype(bool))
    assert torch.equal(keep_float, keep_pil) and torch.equal(keep_bool, keep_pil)
    # a (B, H, W, 3) batch array with an (N, H, W) mask batch, mixed with PIL
    batch = np.stack([np.asarray(image)] * 2)
    keep_batch, pixels_batch = prepare_image_and_mask(batch, [mask, np.asarray(mask)])
    assert keep_batch.shape == (2, 1, 12, 20) and torch.equal(pixels_batch[1], pixels_pil[0])


GOOD_IMAGE = torch.zeros(1, 3, 8, 8)
GOOD_MASK = torch.zeros(1, 1, 8, 8)


@pytest.mark.parametrize(
    "image, mask_image, error, names",
    [
        (GOOD_IMAGE, PIL.Image.new("L", (8, 8)), TypeError, ["image", "mask_image"]),
        (PIL.Image.new("RGB", (8, 8)), GOOD_MASK, TypeError, ["image", "mask_image"]),
        (GOOD_IMAGE, torch.zeros(8, 9), ValueError, ["image", "mask_image"]),
        (PIL.Image.new("RGB", (8, 8)), PIL.Image.new("L", (8, 9)), ValueError, ["image", "mask_image"]),
        (torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 8, 8), ValueError, ["image", "mask_image"]),
        (torch.zeros(2, 3, 8, 8), torch.zeros(3, 8, 8), ValueError, ["mask_image"]),
        ([PIL.Image.new("RGB", (8, 8))] * 2, [PIL.Image.new("L", (8, 8))] * 3, ValueError, ["image", "mask_image"]),
        (PIL.Image.new("RGB", (8, 8)), [PIL.Image.new("L", (8, 8))] * 2, ValueError, ["image", "mask_image"]),
        (torch.full((1, 3, 8, 8), 1.5), GOOD_MASK, ValueError, ["image"]),
        (torch.full((1, 3, 8, 8), float("nan")), GOOD_MASK, ValueError, ["image"]),
        (GOOD_IMAGE, GOOD_MASK - 0.1, ValueError, ["mask_image"]),
        (GOOD_IMAGE, torch.full((1, 1, 8, 8), float("nan")), ValueError, ["mask_image"]),
        (torch.zeros(4, 8, 8), GOOD_MASK, ValueError, ["image"]),
        (torch.zeros(1, 1, 8, 8), GOOD_MASK, ValueError, ["image"]),
        (GOOD_IMAGE, torch.zeros(1, 2, 8, 8), ValueError, ["mask_image"]),
        (GOOD_IMAGE, torch.zeros(8), ValueError, ["mask_image"]),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), GOOD_MASK, TypeError, ["image"]),
        ("image.png", "mask.png", TypeError, ["image"]),
        (PIL.Image.new("RGB", (8, 8)), 3, TypeError, ["mask_image"]),
        ([], [PIL.Image.new("L", (8, 8))], ValueError, ["image"]),
        ([PIL.Image.new("RGB", (8, 8)), PIL.Image.new("RGB", (9, 8))], PIL.Image.new("L", (8, 8)), ValueError,
         ["image"]),
        (np.zeros((8, 8, 4), dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8), ValueError, ["image"]),
        (np.zeros((8, 8, 3), dtype=np.int64), np.zeros((8, 8), dtype=np.uint8), TypeError, ["image"]),
        (np.full((8, 8, 3), 1.5), np.zeros((8, 8), dtype=np.uint8), ValueError, ["image"]),
        (PIL.Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)), PIL.Image.new("L", (8, 8)), ValueError,
         ["image"]),
        (PIL.Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)), PIL.Image.new("L", (8, 8)), ValueError,
         ["image"]),
        (PIL.Image.new("RGB", (8, 8)), PIL.Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)), ValueError,
         ["mask_image"]),
        (np.zeros((8, 8, 3), dtype=np.uint8), np.full((8, 8), 2.0), ValueError, ["mask_image"]),
        (np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((8, 8), dtype=np.int64), TypeError, ["mask_image"]),
        (np.zeros((8, 8, 3), dtype=np.uint8), [np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8)], ValueError,
         ["mask_image"]),
    ],
)
def test_prepare_errors_name_the_argument(image, mask_image, error, names):
    with pytest.raises(error) as info:
        prepare_image_and_mask(image, mask_image)
    for name in names:
        assert f"`{name}" in str(info.value), str(info.value)


def test_load_image(tmp_path):
    path = tmp_path / "example.png"
    PIL.Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(path)
    image = load_image(path)
    assert image.mode == "RGBA" and image.size == (5, 4)
    assert load_image(str(path), mode="RGB").mode == "RGB"
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(OSError, match="broken.png"):
        load_image(broken)
    with pytest.raises(TypeError, match="path_or_image"):
        load_image(42)


def test_load_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    PIL.Image.new("RGB", (30, 20)).save(path, exif=exif)
    assert load_image(path).size == (20, 30)


# --------------------------------------------------------------------------------------------------------------------
# to_numpy / to_pil
# --------------------------------------------------------------------------------------------------------------------


def test_postprocess_parity():
    image_processor = pytest.importorskip("diffusers.image_processor")
    processor = image_processor.VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    decoded[0, 0, 0, :6] = torch.tensor([-1.0, 1.0, 0.5 / 255 * 2 - 1, 1.5 / 255 * 2 - 1, 0.0, 2.5 / 255 * 2 - 1])
    images = (decoded * 0.5 + 0.5).clamp(0, 1)  # the pipeline's denormalisation

    expected_np = processor.postprocess(decoded, output_type="np", do_denormalize=[True, True])
    actual_np = to_numpy(images)
    assert actual_np.dtype == np.float32 and actual_np.shape == (2, 16, 24, 3)
    np.testing.assert_array_equal(actual_np, expected_np)

    expected_pil = processor.postprocess(decoded, output_type="pil", do_denormalize=[True, True])
    actual_pil = to_pil(images)
    assert len(actual_pil) == 2
    for actual, expected in zip(actual_pil, expected_pil):
        assert actual.mode == "RGB" and actual.size == (24, 16)
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_to_pil_rounding_without_reference():
    levels = torch.arange(256, dtype=torch.float32) / 255  # every uint8 level survives the round trip
    images = torch.stack([levels, levels.flip(0), torch.full((256,), 0.6 / 255)]).view(1, 3, 1, 256)
    pixels = np.asarray(to_pil(images)[0])  # (H, W, 3)
    assert pixels.shape == (1, 256, 3)
    assert pixels[0, :, 0].tolist() == list(range(256)) and pixels[0, :, 1].tolist() == list(range(255, -1, -1))
    assert (pixels[0, :, 2] == 1).all()  # rounded, not truncated


@pytest.mark.parametrize(
    "bad, error", [(torch.zeros(3, 4, 4), ValueError), (torch.zeros(1, 1, 4, 4), ValueError),
                   (torch.full((1, 3, 4, 4), 1.5), ValueError), (np.zeros((1, 3, 4, 4)), TypeError)]
)
def test_postprocess_errors_name_the_argument(bad, error):
    with pytest.raises(error, match="`images`"):
        to_pil(bad)
    with pytest.raises(error, match="`images`"):
        to_numpy(bad)


# --------------------------------------------------------------------------------------------------------------------
# pad_to_multiple / crop
# --------------------------------------------------------------------------------------------------------------------


def test_pad_and_crop_round_trip():
    image = torch.rand(2, 3, 13, 30)
    keep_mask = (torch.rand(2, 1, 13, 30) > 0.5).float()
    original_size = tuple(image.shape[-2:])
    padded_image, padded_keep = pad_to_multiple(image, keep_mask)
    assert padded_image.shape == (2, 3, 16, 32) and padded_keep.shape == (2, 1, 16, 32)
    assert padded_keep[..., 13:, :].eq(1).all() and padded_keep[..., :, 30:].eq(1).all()
    assert torch.equal(padded_image[..., 13:, :30], image[..., 12:13, :].expand(2, 3, 3, 30))  # replicated rows
    assert torch.equal(padded_image[..., :13, 30:], image[..., :, 29:30].expand(2, 3, 13, 2))
    assert torch.equal(crop(padded_image, original_size), image)
    assert torch.equal(crop(padded_keep, original_size), keep_mask)

    padded_64, _ = pad_to_multiple(image, keep_mask, 64)
    assert padded_64.shape[-2:] == (64, 64)
    tiny, tiny_keep = pad_to_multiple(torch.rand(1, 3, 1, 1), torch.zeros(1, 1, 1, 1))
    assert tiny.shape == (1, 3, 8, 8) and tiny_keep.sum() == 63
    assert torch.equal(crop(tiny, (1, 1)), tiny[..., :1, :1])


def test_pad_keeps_multiples_unchanged():
    image, keep_mask = torch.rand(1, 3, 16, 24), torch.ones(1, 1, 16, 24)
    padded_image, padded_keep = pad_to_multiple(image, keep_mask)
    assert padded_image is image and padded_keep is keep_mask


def test_pad_and_crop_errors():
    with pytest.raises(ValueError, match="keep_mask"):
        pad_to_multiple(torch.rand(1, 3, 9, 9), torch.ones(1, 1, 9, 8))
    with pytest.raises(ValueError, match="`image`"):
        pad_to_multiple(torch.rand(3, 9, 9), torch.ones(1, 1, 9, 9))
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(torch.rand(1, 3, 9, 9), torch.ones(1, 1, 9, 9), 0)
    with pytest.raises(ValueError, match="original_size"):
        crop(torch.rand(1, 3, 8, 8), (9, 8))


# --------------------------------------------------------------------------------------------------------------------
# paste_back
# --------------------------------------------------------------------------------------------------------------------


def square_keep_mask(size: int = 64, low: int = 20, high: int = 44) -> torch.Tensor:
    """keep_mask (1, 1, size, size) with a repaint square [low, high) x [low, high)."""
    keep_mask = torch.ones(1, 1, size, size)
    keep_mask[..., low:high, low:high] = 0
    return keep_mask


def test_paste_back_hard():
    generator = torch.Generator().manual_seed(0)
    generated, original = torch.rand(2, 3, 64, 64, generator=generator), torch.rand(2, 3, 64, 64, generator=generator)
    keep_mask = square_keep_mask()
    result = paste_back(generated, original, keep_mask)
    keep = keep_mask.bool().expand_as(result)
    assert torch.equal(result[keep], original[keep]) and torch.equal(result[~keep], generated[~keep])


def test_paste_back_feathered():
    generator = torch.Generator().manual_seed(1)
    generated, original = torch.rand(1, 3, 64, 64, generator=generator), torch.rand(1, 3, 64, 64, generator=generator)
    keep_mask = square_keep_mask()
    sigma = 2.0
    reach = math.ceil(3 * sigma)
    result = paste_back(generated, original, keep_mask, blur_radius=sigma)

    far_outside = torch.ones(64, 64, dtype=torch.bool)
    far_outside[20 - reach:44 + reach, 20 - reach:44 + reach] = False
    deep_inside = torch.zeros(64, 64, dtype=torch.bool)
    deep_inside[20 + reach:44 - reach, 20 + reach:44 - reach] = True
    assert torch.equal(result[..., far_outside], original[..., far_outside])
    assert torch.equal(result[..., deep_inside], generated[..., deep_inside])

    # On the seam the result is a true blend, with the repaint weight rising across the edge.
    seam = (result - original) / (generated - original)
    row = seam[0, 0, 32, 20 - reach + 1:20 + reach]
    assert row.min() > 0 and row.max() < 1
    assert (row[1:] >= row[:-1] - 1e-5).all()


def test_paste_back_broadcasts_and_validates():
    generated, original = torch.ones(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    keep_mask = torch.ones(1, 1, 8, 8)
    assert torch.equal(paste_back(generated, original, keep_mask, blur_radius=1.5), original)
    assert torch.equal(paste_back(generated, original, 1 - keep_mask, blur_radius=1.5), generated)
    with pytest.raises(ValueError, match="keep_mask"):
        paste_back(generated, original, torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError, match="generated"):
        paste_back(generated, torch.zeros(2, 3, 8, 9), keep_mask)
    with pytest.raises(ValueError, match="blur_radius"):
        paste_back(generated, original, keep_mask, blur_radius=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_paste_back_keeps_dtype(dtype):
    generator = torch.Generator().manual_seed(2)
    generated = torch.rand(1, 3, 32, 32, generator=generator).to(dtype)
    original = torch.rand(1, 3, 32, 32, generator=generator).to(dtype)
    keep_mask = square_keep_mask(32, 8, 24)
    result = paste_back(generated, original, keep_mask, blur_radius=1.5)
    assert result.dtype == dtype
    assert torch.equal(result[..., :2, :], original[..., :2, :])
    assert torch.equal(result[..., 14:18, 14:18], generated[..., 14:18, 14:18])


# --------------------------------------------------------------------------------------------------------------------
# Every image a user has: 16-bit and float images, masks with transparency, EXIF orientation
# --------------------------------------------------------------------------------------------------------------------


def test_sixteen_bit_png_file_is_scaled_not_white(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 24).round().astype(np.uint16).reshape(24, 40)
    path = tmp_path / "grey16.png"
    PIL.Image.fromarray(ramp).save(path)
    opened = PIL.Image.open(path)
    assert opened.mode == "I;16"  # what Pillow makes of a 16-bit greyscale PNG
    mask = PIL.Image.new("L", (40, 24), 0)
    _, pixels = prepare_image_and_mask(opened, mask)
    expected = torch.from_numpy(sixteen_to_eight(ramp)).float() / 127.5 - 1
    assert torch.equal(pixels[0], expected.expand(3, -1, -1))
    assert pixels.min() == -1 and pixels.max() == 1  # the whole range survives; Pillow alone makes it all white
    # The numpy route reads the same values.
    _, from_array = prepare_image_and_mask(np.repeat(ramp[..., None], 3, axis=-1), np.asarray(mask))
    assert torch.equal(from_array, pixels)


@pytest.mark.parametrize("label, wide, eight", wide_examples(), ids=[case[0] for case in wide_examples()])
def test_to_8bit_every_wide_format(label, wide, eight):
    result = to_8bit(wide)
    as_array = np.asarray(result)
    assert as_array.dtype == np.uint8
    np.testing.assert_array_equal(as_array, eight)


def test_to_8bit_keeps_pillow_reading_of_8bit_data_in_wide_modes():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    as_int = PIL.Image.fromarray(levels).convert("I")
    as_float = PIL.Image.fromarray(levels).convert("F")
    np.testing.assert_array_equal(np.asarray(to_8bit(as_int)), levels)
    np.testing.assert_array_equal(np.asarray(to_8bit(as_float)), levels)
    rgb = PIL.Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_8bit(rgb) is rgb  # 8-bit modes pass through untouched


@pytest.mark.parametrize(
    "wide, message",
    [
        (PIL.Image.fromarray(np.array([[-1.0, 0.5]], dtype=np.float32)), r"\[-1, 0.5\]"),
        (PIL.Image.fromarray(np.array([[0.0, 256.0]], dtype=np.float32)), r"\[0, 256\]"),
        (PIL.Image.fromarray(np.array([[0, 65536]], dtype=np.int32)), r"\[0, 65536\]"),
        (np.array([[0.0, 1.5]]), r"\[0, 1\]"),
        (np.array([[0.0, np.nan]], dtype=np.float32), r"\[0, 1\]"),
    ],
)
def test_to_8bit_refuses_unknown_scales(wide, message):
    with pytest.raises(ValueError, match=message):
        to_8bit(wide, name="picture")
    with pytest.raises(ValueError, match="`picture`"):
        to_8bit(wide, name="picture")


def test_to_8bit_refuses_other_types():
    with pytest.raises(TypeError, match="uint8, uint16 or float"):
        to_8bit(np.zeros((2, 2), dtype=np.int16))
    with pytest.raises(TypeError, match="`image`"):
        to_8bit("picture.png")


def test_sixteen_bit_mask():
    values = np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)  # 32768 / 65535 > 0.5: repaint
    keep_pil, _ = prepare_image_and_mask(PIL.Image.new("RGB", (4, 1)), PIL.Image.fromarray(values))
    keep_np, _ = prepare_image_and_mask(np.zeros((1, 4, 3), np.uint8), values)
    assert keep_pil.flatten().tolist() == [1, 1, 0, 0]
    assert torch.equal(keep_np, keep_pil)


def stroke_mask_rgba(width: int = 32, height: int = 24) -> tuple[PIL.Image.Image, np.ndarray]:
    """A brush-layer export: white RGB everywhere, the strokes only in alpha. Returns (mask, stroke as bool)."""
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[5:9, 3:20] = 255  # an opaque stroke
    alpha[15:18, 10:30] = 200  # a mostly opaque stroke: 200 / 255 > 0.5
    alpha[20:22, 2:8] = 100  # faint paint: 100 / 255 < 0.5, kept
    rgba = np.dstack([np.full((height, width, 3), 255, dtype=np.uint8), alpha])
    return PIL.Image.fromarray(rgba, "RGBA"), alpha > 127


def test_alpha_only_stroke_mask_repaints_only_the_strokes(tmp_path):
    mask, stroke = stroke_mask_rgba()
    path = tmp_path / "strokes.png"
    mask.save(path)
    keep_mask, _ = prepare_image_and_mask(PIL.Image.new("RGB", mask.size), PIL.Image.open(path))
    assert torch.equal(keep_mask[0, 0], torch.from_numpy(~stroke).float())
    repaint = read_repaint_mask(PIL.Image.open(path))
    assert repaint.shape == (1, 1, 24, 32)
    assert repaint[0, 0, 6, 4] == 1 and repaint[0, 0, 0, 0] == 0  # white where opaque, black where transparent


def test_transparent_masks_composite_over_black():
    grey = np.array([[255, 255, 255, 0, 128]], dtype=np.uint8)
    alpha = np.array([[255, 0, 128, 255, 255]], dtype=np.uint8)
    expected = torch.tensor([[[[1.0, 0.0, 128 / 255, 0.0, 128 / 255]]]])
    la = PIL.Image.fromarray(np.dstack([grey, alpha]), "LA")
    assert torch.allclose(read_repaint_mask(la), expected, atol=1e-7)
    assert torch.allclose(read_repaint_mask(la.convert("RGBA")), expected, atol=1e-7)
    # A palette mask with a transparent index: that index is keep, whatever its colour.
    palette = PIL.Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    palette.putpalette([255, 255, 255, 255, 255, 255, 0, 0, 0])
    palette.info["transparency"] = 1
    assert read_repaint_mask(palette).flatten().tolist() == [1.0, 0.0, 0.0]
    # Opaque masks are read exactly as the reference reads them ("L" / 255).
    opaque = random_mask(16, 8, seed=3)
    assert torch.equal(read_repaint_mask(opaque.convert("LA"))[0, 0], torch.from_numpy(np.array(opaque)) / 255.0)


def write_with_orientation(array: np.ndarray, path, orientation: int) -> None:
    """Save ``array`` as stored pixels with an EXIF orientation tag (JPEG or PNG by the suffix)."""
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    PIL.Image.fromarray(array).save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))


# EXIF orientation -> how the stored pixels are shown (numpy on (H, W, ...) arrays), per the EXIF specification.
DISPLAYED = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_of_every_input_file_or_object(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    stored_image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    stored_mask = np.zeros((24, 40), dtype=np.uint8)
    stored_mask[2:10, 3:30] = 255  # not symmetric: a wrong turn cannot go unnoticed
    stored_example = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    image_path, mask_path, example_path = tmp_path / "image.jpg", tmp_path / "mask.png", tmp_path / "example.jpg"
    write_with_orientation(stored_image, image_path, orientation)
    write_with_orientation(stored_mask, mask_path, orientation)
    write_with_orientation(stored_example, example_path, orientation)

    # What the user sees: the decoded stored pixels turned by the tag (computed here with numpy, not Pillow).
    def shown(path):
        return np.ascontiguousarray(DISPLAYED[orientation](np.asarray(PIL.Image.open(path))))

    expected_keep, expected_pixels = prepare_image_and_mask(shown(image_path), shown(mask_path))
    expected_example = preprocess_example(shown(example_path))
    assert expected_keep[0, 0].logical_not().any()

    for opener in (PIL.Image.open, load_image):  # API objects straight from Pillow, and the CLI's loader
        keep_mask, pixels = prepare_image_and_mask(opener(image_path), opener(mask_path))
        assert torch.equal(keep_mask, expected_keep) and torch.equal(pixels, expected_pixels)
        assert torch.equal(preprocess_example(opener(example_path)), expected_example)


def test_upright_is_idempotent(tmp_path):
    path = tmp_path / "turned.jpg"
    write_with_orientation(np.zeros((20, 30, 3), dtype=np.uint8), path, 6)
    once = upright(PIL.Image.open(path))
    assert once.size == (20, 30)
    assert upright(once).size == (20, 30) and upright(upright(once)).size == (20, 30)
