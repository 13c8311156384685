"""Large pictures: which parts to paint, at which size, and how to put them back (IOPaint's ``hd_strategy``).

The model was trained at 512x512; phone photos are 3000x4000. Painted at full size, such a photo costs hours and
is painted at a scale the model never saw. Three strategies, as IOPaint (lama-cleaner) offers them:

* ``"crop"``: one box per connected mask region, grown by a margin of context, boxes that overlap merged, clamped to
  the picture and shifted inward at its borders; each box is scaled so its longer side is ``resolution``, painted,
  scaled back and pasted through the mask. Cost: one ``resolution``-sized run per box, whatever the picture size.
* ``"resize"``: the whole picture scaled so its longer side is ``resolution``, painted, scaled back and pasted
  through the mask. Cost: one run; the painted part has the detail of a ``resolution``-sized picture.
* ``"original"``: the whole picture at its own size (the reference's behaviour; cost grows with the pixel count,
  and self-attention with its square).

A picture whose longer side is at most ``trigger`` pixels is always painted whole at its own size, so 512x512 inputs
keep the reference's path exactly. With "crop" and "resize" every pixel farther from the mask than the feather
radius is the input's, bit for bit (``paste``). Everything here is geometry on tensors: no model, no PIL.

Boxes are half-open pixel ranges ``[top, bottom) x [left, right)`` of the full picture. Masks follow pbe's names:
``repaint_mask`` (1 = paint here) and ``keep_mask`` (1 = keep).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .images import paste_back

STRATEGIES = ("crop", "resize", "original")


@dataclass(frozen=True)
class Box:
    """The pixels ``[top, bottom) x [left, right)`` of a picture."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def slices(self) -> tuple[slice, slice]:
        """Index the last two dimensions: ``tensor[..., rows, columns]``."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def overlaps(self, other: Box) -> bool:
        """Whether the two boxes share at least one pixel (touching edges do not count)."""
        return (self.top < other.bottom and other.top < self.bottom and
                self.left < other.right and other.left < self.right)

    def union(self, other: Box) -> Box:
        """The smallest box holding both."""
        return Box(min(self.top, other.top), min(self.left, other.left),
                   max(self.bottom, other.bottom), max(self.right, other.right))


@dataclass(frozen=True)
class WorkItem:
    """One model run: paint ``box`` of the picture at ``size`` = (height, width) pixels."""

    box: Box
    size: tuple[int, int]

    @property
    def resized(self) -> bool:
        """Whether the box is painted at another size than its own (it must then be scaled there and back)."""
        return self.size != (self.box.height, self.box.width)


# --------------------------------------------------------------------------------------------------------------------
# Connected regions of a mask: runs of pixels along rows, joined by a vectorised union-find
# --------------------------------------------------------------------------------------------------------------------


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of True pixels of an (H, W) bool mask: (row, start, end) arrays, end exclusive.

    Runs come in row-major order, so within a row both starts and ends increase.
    """
    # +1 where a run starts, -1 one past where it ends; (H, W + 1)
    edges = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows, starts, ends


def _touching_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """Pairs (i, j) of runs in consecutive rows (j one row above i) that touch with 8-connectivity.

    [s_i, e_i) and [s_j, e_j) touch, diagonals included, iff s_j <= e_i and e_j >= s_i. Keys row * stride + column
    order all runs; those of row r - 1 touching run i are the contiguous range [lo, hi) found by binary search.
    """
    stride = width + 2
    start_keys, end_keys = rows * stride + starts, rows * stride + ends
    above = (rows - 1) * stride
    lo = np.searchsorted(end_keys, above + starts, side="left")
    hi = np.searchsorted(start_keys, above + ends, side="right")
    counts = np.maximum(hi - lo, 0)
    i = np.repeat(np.arange(len(rows)), counts)
    # j runs through lo[i], lo[i] + 1, ... for each i: the position within each group added to its lo.
    first = np.cumsum(counts) - counts
    j = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(first, counts)
    return i, j


def _components(count: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph with nodes 0..count-1 and edges (i, j): labels 0..k-1, in node order.

    Union-find in whole-array steps: every parent points to a smaller node (so no cycles); each pass hooks the larger
    root of every edge whose ends lie in different trees onto the smaller one, then flattens all trees to depth 1.
    """
    parent = np.arange(count)
    while True:
        root_i, root_j = parent[i], parent[j]
        apart = root_i != root_j
        if not apart.any():
            break
        np.minimum.at(parent, np.maximum(root_i[apart], root_j[apart]), np.minimum(root_i[apart], root_j[apart]))
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
    return np.unique(parent, return_inverse=True)[1].reshape(-1)


def _boxes_of(labels: np.ndarray, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Bounding boxes (k, 4) as (top, left, bottom, right) of the runs grouped by ``labels`` (0..k-1)."""
    count = int(labels.max()) + 1 if len(labels) else 0
    boxes = np.empty((count, 4), dtype=np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = np.iinfo(np.int64).min
    np.minimum.at(boxes[:, 0], labels, rows)
    np.minimum.at(boxes[:, 1], labels, starts)
    np.maximum.at(boxes[:, 2], labels, rows + 1)
    np.maximum.at(boxes[:, 3], labels, ends)
    return boxes


def _as_box_list(boxes: np.ndarray) -> list[Box]:
    """Box objects sorted top to bottom, then left to right."""
    return [Box(*map(int, row)) for row in sorted(boxes.tolist())]


def _as_bool_mask(repaint_mask: torch.Tensor | np.ndarray, *, name: str = "repaint_mask") -> np.ndarray:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (H, W) bool: repaint (> 0.5) in any of the N masks."""
    if isinstance(repaint_mask, torch.Tensor):
        array = repaint_mask.detach().cpu()
        array = (array > 0.5 if array.dtype != torch.bool else array).numpy()
    elif isinstance(repaint_mask, np.ndarray):
        array = repaint_mask > 0.5 if repaint_mask.dtype != np.bool_ else repaint_mask
    else:
        raise TypeError(f"`{name}` must be a torch.Tensor or a numpy array, got {type(repaint_mask).__name__}")
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 3:
        array = array.any(axis=0)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must have shape (H, W), (N, H, W) or (N, 1, H, W), got {tuple(repaint_mask.shape)}")
    return array


def _trim(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The part of the mask inside its bounding box, and the offset (top, left, top, left) to add to its boxes.

    A small mask on a large picture is then labelled in its own few pixels; an empty mask trims to (0, 0).
    """
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return mask[:0, :0], np.zeros(4, dtype=np.int64)
    top, left = rows[0], columns[0]
    return mask[top:rows[-1] + 1, left:columns[-1] + 1], np.array([top, left, top, left], dtype=np.int64)


def mask_regions(repaint_mask: torch.Tensor | np.ndarray) -> list[Box]:
    """One bounding box per connected region (8-connectivity) of the repaint mask, top to bottom, left to right.

    ``repaint_mask``: (H, W), (N, H, W) or (N, 1, H, W), bool or values in [0, 1] with > 0.5 = repaint; several
    masks are united (one picture's crops serve every image of a batch).
    """
    mask, offset = _trim(_as_bool_mask(repaint_mask))
    rows, starts, ends = _runs(mask)
    i, j = _touching_runs(rows, starts, ends, mask.shape[1])
    return _as_box_list(_boxes_of(_components(len(rows), i, j), rows, starts, ends) + offset)


# --------------------------------------------------------------------------------------------------------------------
# Boxes for the crop strategy
# --------------------------------------------------------------------------------------------------------------------


def _merge_overlapping(boxes: list[Box]) -> list[Box]:
    """Replace every group of boxes that overlap (directly or through others) by their union, until none overlap."""
    while True:
        array = np.array([[b.top, b.left, b.bottom, b.right] for b in boxes], dtype=np.int64).reshape(-1, 4)
        top, left, bottom, right = (array[:, k] for k in range(4))
        overlap = ((top[:, None] < bottom[None]) & (top[None] < bottom[:, None]) &
                   (left[:, None] < right[None]) & (left[None] < right[:, None]))
        i, j = np.nonzero(np.triu(overlap, k=1))
        if len(i) == 0:
            return _as_box_list(array)
        labels = _components(len(boxes), i, j)
        merged = np.empty((labels.max() + 1, 4), dtype=np.int64)
        merged[:, :2] = np.iinfo(np.int64).max
        merged[:, 2:] = np.iinfo(np.int64).min
        np.minimum.at(merged[:, 0], labels, top)
        np.minimum.at(merged[:, 1], labels, left)
        np.maximum.at(merged[:, 2], labels, bottom)
        np.maximum.at(merged[:, 3], labels, right)
        boxes = _as_box_list(merged)  # a union may now overlap a third box: go round again


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within Chebyshev distance ``radius`` of a True pixel, in O(H W) for any radius.

    Separable: a pixel is set if its row window, then its column window, holds a True pixel (window sums from
    cumulative sums, so the cost does not grow with the radius).
    """
    for axis in (1, 0):
        size = mask.shape[axis]
        sums = np.cumsum(mask, axis=axis, dtype=np.int32)
        sums = np.concatenate([np.zeros_like(np.take(sums, [0], axis=axis)), sums], axis=axis)
        high = np.minimum(np.arange(size) + radius + 1, size)
        low = np.maximum(np.arange(size) - radius, 0)
        mask = (np.take(sums, high, axis=axis) - np.take(sums, low, axis=axis)) > 0
    return mask


def _shift_inside(box: Box, height: int, width: int) -> Box:
    """Move a box that sticks out of the picture inward, keeping its size, then clamp it to the picture.

    As IOPaint does: at a border the context lost outside is taken on the opposite side; a box larger than the
    picture becomes the whole side.
    """
    def place(low: int, high: int, limit: int) -> tuple[int, int]:
        if low < 0:
            low, high = 0, high - low
        if high > limit:
            low, high = low - (high - limit), limit
        return max(low, 0), min(high, limit)

    top, bottom = place(box.top, box.bottom, height)
    left, right = place(box.left, box.right, width)
    return Box(top, left, bottom, right)


def crop_boxes(repaint_mask: torch.Tensor | np.ndarray, *, margin: int) -> list[Box]:
    """The boxes the crop strategy paints, pairwise disjoint, every repaint pixel in exactly one of them.

    Each connected region's box is grown by ``margin`` pixels on every side; boxes that overlap once grown are merged
    (repeatedly, until none overlap); then each is shifted inward at the picture's borders and clamped to it, and
    boxes that overlap after that are merged too. Every repaint pixel is thus at least ``margin`` pixels from the
    edges of its box, except where the box meets the picture's border.

    Regions closer than ``2 * margin`` pixels (Chebyshev distance) always end merged, so they are grouped first by
    labelling the mask dilated by ``margin - 1``: the result is the same, and a speckled mask with thousands of
    regions does not make thousands of boxes to merge pairwise. ``margin``: an int >= 0, as ``PaintOptions.hd_margin``
    checks it (not checked again here).
    """
    mask = _as_bool_mask(repaint_mask)
    height, width = mask.shape
    # Dilating inside the mask's bounding box only groups the same regions: two regions' dilated squares meet
    # between them, inside the box.
    mask, offset = _trim(mask)
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return []
    width_trimmed = mask.shape[1]
    if margin > 0:
        # Label the dilated mask, then give each run of the mask the label of the dilated run that contains it.
        wide_rows, wide_starts, wide_ends = _runs(_dilate(mask, margin - 1))
        wide_labels = _components(len(wide_rows), *_touching_runs(wide_rows, wide_starts, wide_ends, width_trimmed))
        stride = width_trimmed + 2
        containing = np.searchsorted(wide_rows * stride + wide_starts, rows * stride + starts, side="right") - 1
        labels = np.unique(wide_labels[containing], return_inverse=True)[1].reshape(-1)
    else:
        labels = _components(len(rows), *_touching_runs(rows, starts, ends, width_trimmed))
    grown = [Box(b.top - margin, b.left - margin, b.bottom + margin, b.right + margin)
             for b in _as_box_list(_boxes_of(labels, rows, starts, ends) + offset)]
    inside = [_shift_inside(box, height, width) for box in _merge_overlapping(grown)]
    return _merge_overlapping(inside)


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------


def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) scaled so the longer side is ``resolution``, each side rounded to a multiple of 8 (>= 8).

    ``resolution``: a positive multiple of 8, as ``PaintOptions.resolution`` checks it (not checked again here).
    """
    if height < 1 or width < 1:
        raise ValueError(f"the size to scale must be positive, got (height, width) = ({height}, {width})")
    scale = resolution / max(height, width)
    return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)


def plan(
    image_size: tuple[int, int],
    repaint_mask: torch.Tensor | np.ndarray,
    *,
    strategy: str,
    resolution: int,
    trigger: int,
    margin: int,
) -> list[WorkItem]:
    """The model runs that paint a picture of ``image_size`` = (H, W) with this mask, in the given strategy.

    * ``max(H, W) <= trigger`` or ``strategy="original"``: one item, the whole picture at its own size (``is_as_is``
      tells this case; run the pipeline exactly as without a plan).
    * ``"resize"``: one item, the whole picture at ``working_size(H, W, resolution)``.
    * ``"crop"``: one item per box of ``crop_boxes(repaint_mask, margin=margin)``, each at its ``working_size``.

    With "resize" and "crop", a mask with nothing to repaint gives no items: the output is the input.
    ``repaint_mask``: (H, W), (N, H, W) or (N, 1, H, W), bool or in [0, 1] with > 0.5 = repaint; N masks of a batch
    are united, so one plan serves every image of the batch.

    ``strategy``, ``resolution``, ``trigger`` and ``margin`` are the values ``pbe.options.PaintOptions`` checks
    (``hd_strategy``, ``resolution``, ``hd_trigger``, ``hd_margin``): one of STRATEGIES, a positive multiple of 8, a
    positive int, an int >= 0. They are not checked again here, and have no defaults here: the defaults are
    PaintOptions' too.
    """
    height, width = image_size
    if tuple(repaint_mask.shape[-2:]) != (height, width):
        raise ValueError(f"`repaint_mask` must be {height}x{width} (H x W) like the picture, "
                         f"got shape {tuple(repaint_mask.shape)}")

    whole = Box(0, 0, height, width)
    if strategy == "original" or max(height, width) <= trigger:
        return [WorkItem(whole, (height, width))]
    if strategy == "resize":
        return [WorkItem(whole, working_size(height, width, resolution))] if _as_bool_mask(repaint_mask).any() else []
    if strategy == "crop":
        return [WorkItem(box, working_size(box.height, box.width, resolution))
                for box in crop_boxes(repaint_mask, margin=margin)]
    raise AssertionError(f"plan: unknown strategy {strategy!r}: check the values with pbe.options.PaintOptions")


def is_as_is(items: list[WorkItem], image_size: tuple[int, int]) -> bool:
    """Whether the plan is the whole picture at its own size: run the pipeline as if there were no plan."""
    height, width = image_size
    return items == [WorkItem(Box(0, 0, height, width), (height, width))]


# --------------------------------------------------------------------------------------------------------------------
# Cutting out, scaling, pasting back
# --------------------------------------------------------------------------------------------------------------------


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale (B, C, H, W) pixels to ``size`` = (h, w); the same tensor if the size is already right.

    Bicubic with antialiasing (its kernel widened by the shrink factor, as PIL's resize does): sharper than area
    averaging and, unlike plain bicubic or bilinear, free of aliasing when a 3000-pixel box shrinks to 512. Bicubic
    overshoots at sharp edges, so the result is clamped to the input's own value range ([-1, 1] or [0, 1] alike).
    Computed in float32 (interpolation kernels of half precision are missing on some devices), returned in the
    input's dtype.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    pixels = image.float()
    resized = F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(pixels.min().item(), pixels.max().item()).to(image.dtype)


def resize_keep_mask(keep_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale a (B, 1, H, W) keep mask in {0, 1} to ``size``, repaint winning: the result is still in {0, 1}.

    A working pixel is repaint if any full-size pixel it covers is (adaptive max-pooling of the repaint mask). A
    nearest resize would drop thin strokes when shrinking; this dilates by under one working pixel instead, which
    costs nothing: ``paste`` puts the input back through the exact full-size mask.
    """
    if tuple(keep_mask.shape[-2:]) == tuple(size):
        return keep_mask
    repaint = F.adaptive_max_pool2d(1 - keep_mask.float(), tuple(size))
    return (1 - repaint).to(keep_mask.dtype)


def crop_image(image: torch.Tensor, item: WorkItem) -> torch.Tensor:
    """The item's box cut out of (B, C, H, W) pixels and scaled to its working size (``resize_image``)."""
    return resize_image(image[(..., *item.box.slices)], item.size)


def crop_keep_mask(keep_mask: torch.Tensor, item: WorkItem) -> torch.Tensor:
    """The item's box cut out of a (B, 1, H, W) keep mask and scaled to its working size (``resize_keep_mask``)."""
    return resize_keep_mask(keep_mask[(..., *item.box.slices)], item.size)


def paste(
    picture: torch.Tensor,
    painted: torch.Tensor,
    keep_mask: torch.Tensor,
    item: WorkItem,
    *,
    blur_radius: float = 0.0,
) -> torch.Tensor:
    """Put a painted crop back into the full picture, IN PLACE, through the full-size mask; returns ``picture``.

    ``picture`` (B, 3, H, W) in [0, 1] holds the input (and what earlier items pasted: boxes are disjoint);
    ``painted`` (B, 3, h, w) is the model's output for ``item`` at its working size; ``keep_mask`` (B or 1, 1, H, W)
    is the full picture's, 1 = keep. The crop is scaled back to its box (``resize_image``) and blended by
    ``pbe.images.paste_back`` with the box's part of ``keep_mask``, feathered by ``blur_radius``: a pixel whose
    (2r + 1)-square window, r = ceil(3 * blur_radius), holds no repaint pixel keeps the input's value bit for bit.
    Keep r <= the crop margin, or the feathered band is cut at the box's edge (the guarantee holds regardless).
    """
    if painted.ndim != 4 or painted.shape[:2] != picture.shape[:2] or tuple(painted.shape[-2:]) != item.size:
        raise ValueError(f"`painted` must have shape {(*picture.shape[:2], *item.size)} (the picture's batch and "
                         f"channels, the item's working size), got {tuple(painted.shape)}")
    rows, columns = item.box.slices
    original = picture[..., rows, columns]
    full_size = resize_image(painted, (item.box.height, item.box.width)).to(picture.device, picture.dtype)
    picture[..., rows, columns] = paste_back(full_size, original, keep_mask[..., rows, columns],
                                             blur_radius=blur_radius)
    return picture
