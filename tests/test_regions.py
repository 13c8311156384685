"""Tests for pbe.regions: mask regions, crop boxes, the plan, cutting out, scaling and pasting back.

Connected regions are checked against scipy.ndimage (a test-only oracle); the crop boxes against a direct, slow
implementation of their definition; the paste against the input itself, pixel for pixel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pbe import regions
from pbe.options import PaintOptions
from pbe.regions import (
    Box,
    WorkItem,
    crop_boxes,
    crop_image,
    crop_keep_mask,
    is_as_is,
    mask_regions,
    paste,
    resize_image,
    resize_keep_mask,
)

DEFAULTS = PaintOptions()  # pbe.regions has no defaults of its own: 512-pixel working size, 800 trigger, 128 margin


def plan(image_size: tuple[int, int], repaint_mask, **changes) -> list[WorkItem]:
    """``regions.plan`` with PaintOptions' defaults for what is not given."""
    values = {"strategy": DEFAULTS.hd_strategy, "resolution": DEFAULTS.resolution, "trigger": DEFAULTS.hd_trigger,
              "margin": DEFAULTS.hd_margin}
    return regions.plan(image_size, repaint_mask, **(values | changes))


def working_size(height: int, width: int, resolution: int = DEFAULTS.resolution) -> tuple[int, int]:
    return regions.working_size(height, width, resolution)


def blob_mask(height: int, width: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A bool mask with the given (top, left, bottom, right) rectangles set."""
    mask = np.zeros((height, width), dtype=bool)
    for top, left, bottom, right in boxes:
        mask[top:bottom, left:right] = True
    return mask


def scipy_regions(mask: np.ndarray) -> list[Box]:
    ndimage = pytest.importorskip("scipy.ndimage")
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = [Box(rows.start, columns.start, rows.stop, columns.stop) for rows, columns in ndimage.find_objects(labels)]
    return sorted(boxes, key=lambda b: (b.top, b.left, b.bottom, b.right))


# --------------------------------------------------------------------------------------------------------------------
# mask_regions
# --------------------------------------------------------------------------------------------------------------------


def test_regions_of_simple_shapes():
    mask = blob_mask(40, 60, (2, 3, 6, 9), (30, 40, 35, 58))
    assert mask_regions(mask) == [Box(2, 3, 6, 9), Box(30, 40, 35, 58)]
    # Diagonal neighbours are connected (8-connectivity).
    diagonal = np.eye(6, dtype=bool)
    assert mask_regions(diagonal) == [Box(0, 0, 6, 6)]
    assert mask_regions(np.fliplr(diagonal).copy()) == [Box(0, 0, 6, 6)]
    # A U whose arms meet only at the bottom is one region; a ring around a separate dot is two.
    u_shape = blob_mask(10, 10, (0, 0, 10, 2), (0, 8, 10, 10), (8, 0, 10, 10))
    assert mask_regions(u_shape) == [Box(0, 0, 10, 10)]
    ring = blob_mask(11, 11, (0, 0, 11, 11))
    ring[1:10, 1:10] = False
    ring[5, 5] = True
    assert mask_regions(ring) == [Box(0, 0, 11, 11), Box(5, 5, 6, 6)]
    assert mask_regions(np.zeros((7, 9), dtype=bool)) == []


@pytest.mark.parametrize("density", [0.02, 0.3, 0.5, 0.7])
def test_regions_match_scipy(density):
    rng = np.random.default_rng(int(density * 100))
    mask = rng.random((97, 131)) < density
    assert mask_regions(mask) == scipy_regions(mask)


def test_regions_take_tensors_batches_and_levels():
    one = blob_mask(16, 16, (1, 1, 3, 3))
    other = blob_mask(16, 16, (10, 10, 12, 14))
    batch = torch.from_numpy(np.stack([one, other])).float().unsqueeze(1) * 0.8  # (2, 1, H, W), values 0 or 0.8
    assert mask_regions(batch) == [Box(1, 1, 3, 3), Box(10, 10, 12, 14)]  # the masks of a batch are united
    assert mask_regions(torch.full((4, 4), 0.5)) == []  # 0.5 is kept, as the reference binarises
    with pytest.raises(ValueError, match="repaint_mask"):
        mask_regions(torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="repaint_mask"):
        mask_regions([[0, 1]])


# --------------------------------------------------------------------------------------------------------------------
# crop_boxes
# --------------------------------------------------------------------------------------------------------------------


def naive_crop_boxes(mask: np.ndarray, margin: int) -> list[Box]:
    """The definition, step by step: grow each region's box, merge overlapping pairs until none, shift, merge again."""
    height, width = mask.shape

    def merge(boxes: list[Box]) -> list[Box]:
        merged = True
        while merged:
            merged = False
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    if boxes[a].overlaps(boxes[b]):
                        boxes = [box for k, box in enumerate(boxes) if k not in (a, b)] + [boxes[a].union(boxes[b])]
                        merged = True
                        break
                if merged:
                    break
        return boxes

    def shift(low: int, high: int, limit: int) -> tuple[int, int]:
        if low < 0:
            high, low = high - low, 0
        if high > limit:
            low, high = low - (high - limit), limit
        return max(low, 0), min(high, limit)

    grown = [Box(b.top - margin, b.left - margin, b.bottom + margin, b.right + margin) for b in scipy_regions(mask)]
    inside = []
    for box in merge(grown):
        (top, bottom), (left, right) = shift(box.top, box.bottom, height), shift(box.left, box.right, width)
        inside.append(Box(top, left, bottom, right))
    return sorted(merge(inside), key=lambda b: (b.top, b.left, b.bottom, b.right))


def test_far_apart_blobs_give_two_boxes():
    mask = blob_mask(1000, 1500, (200, 200, 260, 300), (600, 1000, 700, 1100))
    assert crop_boxes(mask, margin=128) == [Box(72, 72, 388, 428), Box(472, 872, 828, 1228)]


def test_close_blobs_are_merged():
    # 200 pixels apart: the boxes grown by 128 overlap, so one box holds both.
    mask = blob_mask(1000, 1500, (200, 200, 260, 300), (460, 200, 500, 320))
    assert crop_boxes(mask, margin=128) == [Box(72, 72, 628, 448)]
    # A merge that makes a box reach a third one merges that one too.
    # A and B overlap once grown by 10; C overlaps neither, only the corner of their union that neither covers.
    chain = blob_mask(600, 600, (100, 100, 110, 110), (112, 115, 122, 125), (135, 80, 140, 85))
    assert len(mask_regions(chain)) == 3
    assert crop_boxes(chain, margin=10) == [Box(90, 70, 150, 135)] == naive_crop_boxes(chain, 10)


def test_border_blob_is_shifted_inward_and_clamped():
    mask = blob_mask(1000, 1500, (0, 1450, 50, 1500))  # top-right corner
    (box,) = crop_boxes(mask, margin=128)
    assert box == Box(0, 1500 - (50 + 256), 50 + 256, 1500)  # full grown size, inside the picture
    assert (box.height, box.width) == (50 + 2 * 128, 50 + 2 * 128)


def test_box_larger_than_the_picture_is_the_picture():
    mask = blob_mask(300, 200, (100, 50, 200, 150))
    assert crop_boxes(mask, margin=128) == [Box(0, 0, 300, 200)]
    assert crop_boxes(blob_mask(300, 200, (0, 0, 300, 200)), margin=0) == [Box(0, 0, 300, 200)]


@pytest.mark.parametrize("margin", [0, 1, 3, 8])
def test_crop_boxes_follow_their_definition(margin):
    rng = np.random.default_rng(margin)
    for density in (0.001, 0.01, 0.05):
        mask = rng.random((90, 140)) < density
        boxes = crop_boxes(mask, margin=margin)
        assert boxes == naive_crop_boxes(mask, margin)
        # Disjoint, inside the picture, and every repaint pixel in exactly one box.
        for a, first in enumerate(boxes):
            assert 0 <= first.top < first.bottom <= 90 and 0 <= first.left < first.right <= 140
            assert not any(first.overlaps(second) for second in boxes[a + 1:])
        covered = np.zeros(mask.shape, dtype=int)
        for box in boxes:
            covered[box.slices] += 1
        assert (covered[mask] == 1).all()


def test_crop_boxes_of_a_speckled_photo_mask_are_quick():
    mask = np.random.default_rng(0).random((3000, 4000)) < 0.001  # about 12,000 separate dots
    assert crop_boxes(mask, margin=128) == [Box(0, 0, 3000, 4000)]


# --------------------------------------------------------------------------------------------------------------------
# working_size and plan
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(556, 556), (3000, 2000), (2000, 3000), (300, 1200), (1000, 7), (17, 9)])
@pytest.mark.parametrize("resolution", [512, 768, 64])
def test_working_size(height, width, resolution):
    size = working_size(height, width, resolution)
    assert all(side % 8 == 0 and side >= 8 for side in size)
    assert max(size) == resolution
    longer, shorter = (0, 1) if height >= width else (1, 0)
    exact = (height, width)[shorter] * resolution / (height, width)[longer]
    assert abs(size[shorter] - exact) <= 4 or size[shorter] == 8  # the nearest multiple of 8


@pytest.mark.parametrize("strategy", ["crop", "resize", "original"])
@pytest.mark.parametrize("size", [(512, 512), (800, 600), (64, 800), (8, 8)])
def test_below_the_trigger_the_plan_is_the_identity(strategy, size):
    mask = torch.zeros(1, 1, *size)
    mask[..., : size[0] // 2, : size[1] // 2] = 1
    items = plan(size, mask, strategy=strategy)
    assert items == [WorkItem(Box(0, 0, *size), size)]
    assert is_as_is(items, size) and not items[0].resized
    assert is_as_is(plan(size, torch.zeros(1, 1, *size), strategy=strategy), size)  # even with nothing to paint


def test_plan_above_the_trigger():
    size = (3000, 2000)
    mask = torch.zeros(1, 1, *size)
    mask[..., 1000:1300, 500:800] = 1
    mask[..., 2900:, 1950:] = 1  # bottom-right corner
    crop = plan(size, mask)
    assert [item.box for item in crop] == crop_boxes(mask, margin=128)
    assert [item.size for item in crop] == [working_size(item.box.height, item.box.width) for item in crop]
    assert crop[0].size == (512, 512) and crop[0].resized and not is_as_is(crop, size)

    assert plan(size, mask, strategy="resize") == [WorkItem(Box(0, 0, 3000, 2000), (512, 344))]
    assert is_as_is(plan(size, mask, strategy="original"), size)
    assert plan(size, mask, strategy="crop", trigger=3000) == plan(size, mask, strategy="original")
    # 300x300 + 2 * 16 -> 256x256; the corner's 100x50 + 2 * 16 = 132x82 -> 256 x 159 -> 256 x 160
    assert [i.size for i in plan(size, mask, resolution=256, margin=16)] == [(256, 256), (256, 160)]
    # Nothing to repaint: nothing to do, the output is the input.
    assert plan(size, torch.zeros(1, 1, *size)) == [] and plan(size, torch.zeros(*size), strategy="resize") == []


def test_plan_mask_size_must_match():
    with pytest.raises(ValueError, match="repaint_mask"):
        plan((900, 901), torch.zeros(900, 900))


# --------------------------------------------------------------------------------------------------------------------
# Cutting out and scaling
# --------------------------------------------------------------------------------------------------------------------


def test_crop_and_resize_image():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 300, 200, generator=generator) * 2 - 1
    item = WorkItem(Box(10, 20, 110, 70), (64, 32))
    cut = crop_image(image, item)
    assert cut.shape == (2, 3, 64, 32) and cut.dtype == image.dtype
    region = image[..., 10:110, 20:70]
    assert cut.min() >= region.min() and cut.max() <= region.max()  # bicubic overshoot clamped
    # Close to the area average of the region (a smooth image would be closer; this is noise shrunk by 3x).
    assert (cut.mean() - region.mean()).abs() < 0.02
    same = WorkItem(Box(10, 20, 110, 70), (100, 50))
    assert torch.equal(crop_image(image, same), region)
    assert resize_image(region, (100, 50)) is region
    assert crop_image(image.to(torch.bfloat16), item).dtype == torch.bfloat16


def test_resize_keep_mask_keeps_thin_strokes():
    keep_mask = torch.ones(1, 1, 1000, 1000)
    keep_mask[..., 500, 100:900] = 0  # a one-pixel line, shrunk 8 times
    small = resize_keep_mask(keep_mask, (125, 125))
    assert set(small.unique().tolist()) == {0.0, 1.0}
    assert (small[0, 0, 62, 13:112] == 0).all()  # rows 496..503 and columns 104..895 hold the line
    assert (small == 0).sum() <= 2 * 102  # dilated by at most one working pixel
    # Growing a mask keeps every repaint pixel's area repaint.
    grown = resize_keep_mask(keep_mask[..., 490:510, 90:110], (40, 40))
    assert (grown[0, 0, 20:22, 20:] == 0).all()
    as_is = crop_keep_mask(keep_mask, WorkItem(Box(400, 0, 600, 1000), (200, 1000)))
    assert torch.equal(as_is, keep_mask[..., 400:600, :])


# --------------------------------------------------------------------------------------------------------------------
# paste
# --------------------------------------------------------------------------------------------------------------------


def near_mask(repaint: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within Chebyshev distance ``radius`` of a repaint pixel, (B, 1, H, W) -> (H, W) bool."""
    # The square window as a row window then a column window (a max filter is separable).
    rows = F.max_pool2d(repaint.float(), (1, 2 * radius + 1), stride=1, padding=(0, radius))
    return F.max_pool2d(rows, (2 * radius + 1, 1), stride=1, padding=(radius, 0))[0, 0] > 0


@pytest.mark.parametrize("blur_radius", [0.0, 2.5])
def test_paste_back_is_bit_exact_away_from_the_mask_on_a_photo(blur_radius):
    height, width = 3000, 2000
    generator = torch.Generator().manual_seed(0)
    picture = torch.rand(1, 3, height, width, generator=generator)
    keep_mask = torch.ones(1, 1, height, width)
    keep_mask[..., 1000:1300, 500:800] = 0
    keep_mask[..., 1500:1520, 700:1300] = 0
    keep_mask[..., 2950:, :60] = 0  # at a corner
    original = picture.clone()

    items = plan((height, width), 1 - keep_mask)
    assert len(items) == 2
    for item in items:
        # What the model would paint: anything, here a flat grey at the working size.
        painted = torch.full((1, 3, *item.size), 0.25)
        assert paste(picture, painted, keep_mask, item, blur_radius=blur_radius) is picture

    radius = math.ceil(3 * blur_radius)
    far = ~near_mask(1 - keep_mask, radius)
    assert torch.equal(picture[..., far], original[..., far])
    deep = ~near_mask(keep_mask, radius)  # repaint pixels whose whole window is repaint
    assert (picture[..., deep] == 0.25).all()
    if blur_radius:
        seam = near_mask(1 - keep_mask, radius) & near_mask(keep_mask, radius)
        assert not torch.equal(picture[..., seam], original[..., seam])


def test_resize_strategy_pastes_through_the_full_size_mask():
    height, width = 1200, 900
    picture = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    keep_mask = torch.ones(1, 1, height, width)
    keep_mask[..., 300:303, 100:800] = 0  # a thin line: 3 pixels, under one pixel once shrunk
    original = picture.clone()
    (item,) = plan((height, width), 1 - keep_mask, strategy="resize")
    assert item.size == (512, 384)
    working_keep = crop_keep_mask(keep_mask, item)
    assert (working_keep == 0).any()  # the line survives shrinking
    painted = crop_image(picture, item).flip(-1)  # any picture at the working size
    paste(picture, painted, keep_mask, item)
    keep = keep_mask[0, 0].bool()
    assert torch.equal(picture[..., keep], original[..., keep])
    assert not torch.equal(picture[..., ~keep], original[..., ~keep])


def test_paste_checks_the_painted_shape():
    picture = torch.rand(1, 3, 100, 100)
    item = WorkItem(Box(0, 0, 50, 50), (64, 64))
    with pytest.raises(ValueError, match="painted"):
        paste(picture, torch.rand(1, 3, 50, 50), torch.ones(1, 1, 100, 100), item)
