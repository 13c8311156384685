"""Training data: a manifest of pictures with object boxes, the paper's sample construction, a deterministic loader.

Yang et al., "Paint by Example" (arXiv 2211.13227), section 4.1, as the official ``ldm/data/open-images.py`` builds
one training sample from a picture and one object box in it:

1. **Reference**: the box padded by up to ``reference_padding`` px (less at the picture's border), augmented by
   albumentations (resize to 224, horizontal flip, rotation within +-20 degrees, blur, elastic warp), CLIP-normalised.
   A row may name its own ``reference`` picture instead (e.g. a garment photographed alone): it is augmented whole.
2. **Mask**: the box extended on each side by ``randint(0, 0.4 x free space)``; with probability 0.5 the region is
   instead a Bezier-bulged shape around the box (one degree-2 curve per edge pulled halfway to the extended box, 18
   points per curve jittered by +-5 px, filled as a polygon).
3. **Scene**: a random square crop of the picture containing the extended box, shrunk by
   ``randint(0, 0.6 x margin)``, resized to 512 x 512.

A sample is ``{"image": [3, R, R] in [-1, 1], "keep_mask": [1, R, R] (1 = keep, 0 = repaint), "reference": [3, 224,
224] CLIP-normalised}``; the training step forms the masked image ``image * keep_mask`` and the latent mask (a
bilinear resize of ``keep_mask``).

**Manifest.** JSONL, one object per line: ``{"image": "pictures/a.jpg", "box": [x0, y0, x1, y1], "reference":
"b.jpg"}`` (``reference`` optional), or CSV with a header: ``image`` and ``box`` (``"x0 y0 x1 y1"``, commas or a JSON
list also read) or the four columns ``x0, y0, x1, y1``, and optionally ``reference``. Boxes are in pixels of the
picture as stored (no EXIF rotation), ``x1``/``y1`` exclusive; fractional boxes are widened to whole pixels.
Relative paths are relative to the manifest's folder. Reading a manifest checks every row and opens only the
pictures' headers (for their sizes); the pixels are read when a sample is drawn.

**Determinism.** Every random choice of sample ``i`` in epoch ``e`` comes from generators seeded by ``(seed, e, i)``,
so a sample does not depend on the worker that draws it nor on what was drawn before. ``make_loader`` shuffles the
order with ``(seed, e)``, splits every global batch across ranks and can skip the first batches of an epoch, so an
interrupted run resumes on exactly the samples it would have seen.

Needs the ``train`` extra (albumentations, which brings OpenCV): ``pip install 'pbe[train]'``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UsageError
from ..images import CLIP_MEAN, CLIP_STD

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


class ManifestError(UsageError):
    """A manifest, a row of it or a picture it names that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class DataConfig:
    """How a training sample is built: the official open-images.py recipe as defaults."""

    resolution: int = 512  # side of the square scene crop the model trains on (image_size in configs/v1.yaml)
    reference_size: int = 224  # side of the reference crop (CLIP ViT-L/14's input)
    reference_padding: int = 10  # px added around the box for the reference crop, fewer at the picture's border
    box_area_range: tuple[float, float] = (0.02, 0.8)  # boxes kept: area / picture area in this range (Open Images)
    box_extension: float = 0.4  # each box side grows by randint(0, box_extension x free space on that side)
    bezier_mask_prob: float = 0.5  # probability of the Bezier-bulged mask instead of the extended box
    bezier_jitter: int = 5  # px: each Bezier point moves by randint(-jitter, jitter) in x and in y
    crop_shrink: float = 0.6  # the square scene crop shrinks by randint(0, crop_shrink x its margin) on each side
    flip_prob: float = 0.5  # reference: horizontal flip
    rotate_prob: float = 0.5  # reference: rotation ...
    rotate_limit: float = 20.0  # ... by an angle uniform in +-rotate_limit degrees
    blur_prob: float = 0.3  # reference: box blur ...
    blur_kernel: tuple[int, int] = (3, 7)  # ... with an odd kernel size in this range (3, 5 or 7)
    elastic_prob: float = 0.3  # reference: elastic transform (with the affine warp albumentations 0.4.3 did in it)
    elastic_alpha: float = 1.0  # displacement scale of the elastic transform
    elastic_sigma: float = 50.0  # Gaussian smoothing of the displacement field, px
    elastic_affine: float = 50.0  # px: the random affine warp inside 0.4.3's elastic transform (alpha_affine); 0: none

    def __post_init__(self) -> None:
        for name in ("resolution", "reference_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"DataConfig.{name} must be a positive multiple of 8, got {value!r}")
        for name in ("reference_padding", "bezier_jitter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("box_extension", "crop_shrink", "bezier_mask_prob", "flip_prob", "rotate_prob", "blur_prob",
                     "elastic_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DataConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        low, high = self.box_area_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"DataConfig.box_area_range must be (low, high) with 0 <= low <= high <= 1, "
                             f"got {self.box_area_range!r}")
        if not 3 <= self.blur_kernel[0] <= self.blur_kernel[1]:
            raise ValueError(f"DataConfig.blur_kernel must be (low, high) with 3 <= low <= high, "
                             f"got {self.blur_kernel!r}")
        # The affine warp's scale spread (reference_augmentation) stays under 1, or the warp may mirror the picture.
        most = math.sqrt(2) * (self.reference_size // 3)
        if not 0 <= self.elastic_affine < most:
            raise ValueError(f"DataConfig.elastic_affine must be in [0, sqrt(2) x (reference_size // 3)) = [0, "
                             f"{most:.1f}) px for reference_size {self.reference_size}, got {self.elastic_affine!r}")
        if self.rotate_limit < 0 or self.elastic_alpha < 0 or self.elastic_sigma < 1:
            raise ValueError(f"DataConfig.rotate_limit and elastic_alpha must be >= 0 and elastic_sigma >= 1, got "
                             f"{self.rotate_limit!r}, {self.elastic_alpha!r}, {self.elastic_sigma!r}")


@dataclass(frozen=True)
class TrainRow:
    """One manifest row: a picture, one object box in it, optionally a separate reference picture."""

    image: Path  # the scene picture
    box: Box  # the object, in the picture's pixels
    size: tuple[int, int]  # the picture's (width, height), read from its header
    reference: Path | None = None  # the reference picture; None: the crop of the box
    where: str = ""  # "manifest.jsonl:3", for messages


# ---- the manifest


def _picture_size(path: Path, *, where: str, field: str) -> tuple[int, int]:
    """(width, height) from the picture's header only: PIL reads the pixels lazily."""
    try:
        with PIL.Image.open(path) as picture:
            return picture.size
    except FileNotFoundError:
        raise ManifestError(f"{where}: {field} {path}: no such file") from None
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise ManifestError(f"{where}: {field} {path} cannot be read as a picture ({err})") from None


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _csv_number(text: str) -> float | str:
    """A CSV cell's number, or the text itself (refused with the box)."""
    try:
        return float(text)
    except ValueError:
        return text


def _parse_box(value: object, *, where: str) -> tuple[float, float, float, float]:
    numbers = [_number(v) for v in value] if isinstance(value, (list, tuple)) else []
    if len(numbers) != 4 or any(n is None for n in numbers):
        raise ManifestError(f"{where}: box must be 4 numbers [x0, y0, x1, y1], got {value!r}")
    x0, y0, x1, y1 = numbers
    if x0 >= x1 or y0 >= y1:
        raise ManifestError(f"{where}: box [x0, y0, x1, y1] must have x0 < x1 and y0 < y1, got {value!r}")
    return x0, y0, x1, y1  # type: ignore[return-value]


def _row(record: dict[str, Any], *, folder: Path, where: str, sizes: dict[Path, tuple[int, int]]) -> TrainRow:
    for name in ("image", "box"):
        if record.get(name) in (None, ""):
            raise ManifestError(f"{where}: missing field {name!r}")
    if not isinstance(record["image"], str):
        raise ManifestError(f"{where}: image must be a path (a string), got {record['image']!r}")
    x0, y0, x1, y1 = _parse_box(record["box"], where=where)
    image = folder / record["image"]
    if image not in sizes:
        sizes[image] = _picture_size(image, where=where, field="image")
    width, height = sizes[image]
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ManifestError(f"{where}: box {[x0, y0, x1, y1]} lies outside its picture {image} "
                            f"({width}x{height}, width x height)")
    reference = record.get("reference")
    if reference in (None, ""):
        reference = None
    elif not isinstance(reference, str):
        raise ManifestError(f"{where}: reference must be a path (a string), got {reference!r}")
    else:
        reference = folder / reference
        _picture_size(reference, where=where, field="reference")
    # The smallest whole-pixel box covering the given one (stays inside the picture: its size is whole pixels).
    box = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
    return TrainRow(image=image, box=box, size=(width, height), reference=reference, where=where)


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every row of a JSONL or CSV manifest."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as file:
        if suffix == ".jsonl":
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ManifestError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
        else:
            reader = csv.DictReader(file)
            columns = set(reader.fieldnames or ())
            for record in reader:
                if "box" not in columns and {"x0", "y0", "x1", "y1"} <= columns:
                    record["box"] = [_csv_number(record.pop(k)) for k in ("x0", "y0", "x1", "y1")]
                elif record.get("box"):  # "x0 y0 x1 y1", "x0,y0,x1,y1" or "[x0, y0, x1, y1]"
                    record["box"] = [_csv_number(t) for t in record["box"].strip("[] ").replace(",", " ").split()]
                yield reader.line_num, record


def read_manifest(path: str | Path) -> list[TrainRow]:
    """Read and check a JSONL or CSV manifest of pictures with object boxes (format: the module docstring).

    Every row is checked before anything is trained: fields present, a box of 4 numbers with ``x0 < x1`` and
    ``y0 < y1`` inside its picture, pictures readable (only their headers are opened). A bad row raises
    ``ManifestError`` naming ``file:line`` and the field.
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ManifestError(f"manifest {path}: unknown format {path.suffix or '(no suffix)'!r}, "
                            "expected .jsonl or .csv")
    if not path.is_file():
        raise ManifestError(f"manifest {path}: no such file")
    sizes: dict[Path, tuple[int, int]] = {}
    rows = [_row(record, folder=path.parent, where=f"{path}:{number}", sizes=sizes)
            for number, record in _records(path)]
    if not rows:
        raise ManifestError(f"manifest {path} is empty: no rows")
    return rows


# ---- one sample's geometry (pure python: every draw from one random.Random, in the official code's order)


@dataclass(frozen=True)
class SampleGeometry:
    """Where sample i of an epoch comes from, in the picture's pixels."""

    extended_box: Box  # the box grown on each side: the repaint region when there is no polygon
    polygon: tuple[tuple[float, float], ...] | None  # the Bezier-bulged repaint region, or None for the box
    crop: Box  # the scene crop resized to resolution x resolution (square but for the reference quirks)


def _bezier(nodes: tuple[float, float, float], t: float) -> float:
    """Degree-2 Bernstein polynomial: (1-t)^2 n0 + 2 t (1-t) n1 + t^2 n2."""
    return (1 - t) ** 2 * nodes[0] + 2 * t * (1 - t) * nodes[1] + t**2 * nodes[2]


def _bezier_polygon(box: Box, extended: Box, *, jitter: int, rng: random.Random) -> tuple[tuple[float, float], ...]:
    """The box's four edges as degree-2 Bezier curves bulging halfway to the extended box, sampled and jittered."""
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = extended
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    # Clockwise from the top-left corner: top, right, bottom, left; (x nodes, y nodes) of each curve.
    edges = (((x0, xm, x1), (y0, ey0, y0)), ((x1, ex1, x1), (y0, ym, y1)),
             ((x1, xm, x0), (y1, ey1, y1)), ((x0, ex0, x0), (y1, ym, y0)))
    points = []
    for xs, ys in edges:
        # Reference quirk: t = 0.05, 0.10, ..., 0.90 (range(1, 19)): the curves' ends at t = 0 and t >= 0.95 are never
        # sampled, so the polygon cuts the box's corners.
        # Not copied: the official loop also skips a point whose x or y equals (as floats) one already kept on that
        # edge, which drops mirrored points by rounding accident; every point is kept here.
        for i in range(1, 19):
            t = i * 0.05
            x = _bezier(xs, t) + rng.randint(-jitter, jitter)
            points.append((x, _bezier(ys, t) + rng.randint(-jitter, jitter)))  # x's jitter drawn first
    return tuple(points)


def _scene_crop(extended: Box, width: int, height: int, *, shrink: float, rng: random.Random) -> Box:
    """A random square window of side min(width, height) containing the extended box, shrunk by up to its margin."""
    ex0, ey0, ex1, ey1 = extended
    side = min(width, height)
    horizontal = width > height
    # The window slides along the long axis: its start lies in [low, high] so that it holds the extended box.
    lo, hi, long_side = (ex0, ex1, width) if horizontal else (ey0, ey1, height)
    low, high = max(hi - side, 0), min(lo + side, long_side) - side
    if high <= low:
        # Reference quirk: when the window has one position or none, the whole picture is used (unshrunk) and the
        # resize to a square distorts it: a square picture, an extended box longer than the short side, or one
        # reaching either end of the long side (only the window flush with that end holds it).
        return (0, 0, width, height)
    start = rng.randint(low, high)
    if horizontal:
        margin = min(ey0, ex0 - start, start + side - ex1, height - ey1)
        cut = rng.randint(0, int(shrink * margin))
        return (start + cut, cut, start + side - cut, side - cut)
    margin = min(ey0 - start, ex0, width - ex1, start + side - ey1)
    cut = rng.randint(0, int(shrink * margin))
    return (cut, start + cut, side - cut, start + side - cut)


def draw_geometry(box: Box, size: tuple[int, int], *, config: DataConfig, rng: random.Random) -> SampleGeometry:
    """The random geometry of one sample: extended box, optional Bezier polygon, scene crop (draws in that order)."""
    width, height = size
    x0, y0, x1, y1 = box
    grow = config.box_extension
    extended = (x0 - rng.randint(0, int(grow * x0)), y0 - rng.randint(0, int(grow * y0)),
                x1 + rng.randint(0, int(grow * (width - x1))), y1 + rng.randint(0, int(grow * (height - y1))))
    polygon = None
    if rng.uniform(0, 1) < config.bezier_mask_prob:
        polygon = _bezier_polygon(box, extended, jitter=config.bezier_jitter, rng=rng)
    crop = _scene_crop(extended, width, height, shrink=config.crop_shrink, rng=rng)
    return SampleGeometry(extended_box=extended, polygon=polygon, crop=crop)


def _keep_mask(geometry: SampleGeometry, resolution: int) -> np.ndarray:
    """uint8 [R, R], 1 = keep, 0 = repaint: drawn at the crop's pixels, then resized."""
    cx0, cy0, cx1, cy1 = geometry.crop
    mask = PIL.Image.new("L", (cx1 - cx0, cy1 - cy0), 1)
    draw = PIL.ImageDraw.Draw(mask)
    if geometry.polygon is None:
        ex0, ey0, ex1, ey1 = geometry.extended_box
        draw.rectangle((ex0 - cx0, ey0 - cy0, ex1 - cx0 - 1, ey1 - cy0 - 1), fill=0)  # PIL's corners are inclusive
    else:
        draw.polygon([(x - cx0, y - cy0) for x, y in geometry.polygon], fill=0)
    # Nearest keeps the mask 0/1, as inference binarises the user's mask; the official code resized it bilinearly
    # (soft edges, under a pixel wide at 512). The training step's latent mask is the soft, bilinear one.
    return np.asarray(mask.resize((resolution, resolution), PIL.Image.Resampling.NEAREST))


# ---- the reference augmentations (albumentations, imported here only)


def reference_augmentation(config: DataConfig) -> Any:
    """The official reference augmentations in albumentations 2.x (``A.Compose``); seeded per sample by the caller.

    The official code used albumentations 0.4.3; its defaults, which 2.x changed, are spelled out here.
    """
    # albumentations asks PyPI for a newer version at import (2 s and a warning offline); pbe reaches no network.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations as A  # noqa: N812 (the library's own spelling)
        import cv2
    except ImportError as err:
        raise ImportError(f"pbe's training data needs albumentations: pip install 'pbe[train]' ({err})") from None
    # OpenCV's own thread pool does not survive fork(): a DataLoader worker forked while its threads exist may hang.
    # Without the pool (0: no threading) nothing is inherited; the loader's workers are the parallelism.
    cv2.setNumThreads(0)
    size = config.reference_size
    # 0.4.3 filled borders by reflection (cv2.BORDER_REFLECT_101); 2.x defaults to a constant 0 border.
    reflect = cv2.BORDER_REFLECT_101
    # 0.4.3's ElasticTransform first warped the picture by a random affine map (alpha_affine = a = 50 px: the three
    # points centre +- side//3 each moved by uniform(-a, a) in x and in y), then displaced it elastically (alpha=1,
    # sigma=50: under a pixel, so the affine map was most of what it did). 2.x removed alpha_affine; its migration
    # note says to add A.Affine. That map is I + D, each entry of D a difference of two uniform(-a, a) over
    # 2 x (side // 3) (std 0.28 at 224 px), and it moves the centre by the mean of two uniform(-a, a) (std a / sqrt(6)
    # = 20 px). A.Affine draws per-axis scale, shear and shift uniformly with those spreads: scale 1 +- 0.48, shear
    # +- atan(0.48) = 25.6 degrees, shift +- 35 px at 224.
    # uniform(-s, s) has std s / sqrt(3)
    spread = config.elastic_affine * math.sqrt(2 / 3) / (2 * (size // 3)) * math.sqrt(3)
    shear = math.degrees(math.atan(spread))
    shift = config.elastic_affine / math.sqrt(6) * math.sqrt(3) / size
    affine = A.Affine(scale={"x": (1 - spread, 1 + spread), "y": (1 - spread, 1 + spread)},
                      shear={"x": (-shear, shear), "y": (-shear, shear)},
                      translate_percent={"x": (-shift, shift), "y": (-shift, shift)}, border_mode=reflect, p=1.0)
    # 0.4.3 drew the elastic field uniform in [-1, 1]; 2.x defaults to Gaussian noise.
    elastic = A.ElasticTransform(alpha=config.elastic_alpha, sigma=config.elastic_sigma, border_mode=reflect,
                                 noise_distribution="uniform", p=1.0)
    return A.Compose([
        A.Resize(height=size, width=size),  # cv2 bilinear, as 0.4.3
        A.HorizontalFlip(p=config.flip_prob),
        A.Rotate(limit=config.rotate_limit, border_mode=reflect, p=config.rotate_prob),
        A.Blur(blur_limit=config.blur_kernel, p=config.blur_prob),
        A.Sequential([affine, elastic] if config.elastic_affine else [elastic], p=config.elastic_prob),
    ])


# ---- the dataset


def _clip_normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] normalised with CLIP's mean and std."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255
    return (tensor - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _read_rgb(path: Path, *, where: str, field: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as picture:
            return picture.convert("RGB")
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise ManifestError(f"{where}: {field} {path} cannot be read as a picture ({err})") from None


class PaintByExampleDataset(Dataset):
    """The paper's training samples from a manifest (format and recipe: the module docstring).

    ``dataset[i]`` draws sample ``i`` of the current epoch (``set_epoch``); ``dataset[(epoch, i)]`` names the epoch
    explicitly (what ``make_loader``'s workers receive, so persistent workers need no epoch message). The same
    ``(seed, epoch, i)`` always gives the same sample. Rows whose box covers a fraction of its picture outside
    ``config.box_area_range`` are left out (counted in ``skipped``, with a warning), as the paper left out Open
    Images boxes smaller than 2% or larger than 80% of the picture.
    """

    def __init__(self, rows_or_manifest: Sequence[TrainRow] | str | Path, *, config: DataConfig = DataConfig(),
                 seed: int = 23) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        rows = (read_manifest(rows_or_manifest) if isinstance(rows_or_manifest, (str, Path))
                else list(rows_or_manifest))
        if not rows:
            raise ValueError("rows_or_manifest must hold at least one row, got none")
        low, high = config.box_area_range

        def area(row: TrainRow) -> float:
            x0, y0, x1, y1 = row.box
            return (x1 - x0) * (y1 - y0) / (row.size[0] * row.size[1])

        self.rows = [row for row in rows if low <= area(row) <= high]
        self.skipped = len(rows) - len(self.rows)
        if not self.rows:
            raise ManifestError(f"every one of the {len(rows)} rows has a box covering a fraction of its picture "
                                f"outside DataConfig.box_area_range {config.box_area_range}")
        if self.skipped:
            warnings.warn(f"{self.skipped} of {len(rows)} rows left out: their box covers a fraction of the picture "
                          f"outside DataConfig.box_area_range {config.box_area_range}", stacklevel=2)
        self.config = config
        self.seed = seed
        self.epoch = 0
        self.augment = reference_augmentation(config)  # here, so a missing albumentations is refused at once

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Draw ``dataset[i]`` from this epoch from now on."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def _generators(self, epoch: int, index: int) -> tuple[random.Random, np.random.Generator, random.Random]:
        """Independent generators for the geometry and for albumentations, all from (seed, epoch, index)."""
        states = np.random.SeedSequence([self.seed, epoch, index]).generate_state(3, dtype=np.uint64)
        return random.Random(int(states[0])), np.random.default_rng(int(states[1])), random.Random(int(states[2]))

    def _locate(self, item: int | tuple[int, int]) -> tuple[int, int]:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.rows)} samples")
        return epoch, index

    def geometry(self, item: int | tuple[int, int]) -> SampleGeometry:
        """The geometry ``self[item]`` uses (for tests and for looking at the data)."""
        epoch, index = self._locate(item)
        row = self.rows[index]
        return draw_geometry(row.box, row.size, config=self.config, rng=self._generators(epoch, index)[0])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = self._locate(item)
        row, config = self.rows[index], self.config
        geometry_rng, augment_np, augment_py = self._generators(epoch, index)
        geometry = draw_geometry(row.box, row.size, config=config, rng=geometry_rng)
        picture = _read_rgb(row.image, where=row.where, field="image")
        if picture.size != row.size:  # the geometry was drawn for the size the manifest check read
            raise ManifestError(f"{row.where}: image {row.image} is {picture.size[0]}x{picture.size[1]} now, "
                                f"{row.size[0]}x{row.size[1]} when the manifest was read")

        # The reference: the box padded by up to reference_padding px, or a picture of its own; augmented.
        if row.reference is None:
            x0, y0, x1, y1 = row.box
            pad, (width, height) = config.reference_padding, row.size
            padded = (x0 - min(pad, x0), y0 - min(pad, y0), x1 + min(pad, width - x1), y1 + min(pad, height - y1))
            reference = np.asarray(picture.crop(padded))
        else:
            reference = np.asarray(_read_rgb(row.reference, where=row.where, field="reference"))
        # One shared generator pair for the whole Compose: Compose(seed=) / set_random_seed would give every
        # transform its own copy of the same stream, so flip and rotate (both p=0.5) would always fire together.
        self.augment.set_random_state(augment_np, augment_py)
        reference = self.augment(image=reference)["image"]

        # The scene: the crop, resized (PIL bilinear, antialiased; the official code resized float tensors).
        size = (config.resolution, config.resolution)
        scene = np.asarray(picture.crop(geometry.crop).resize(size, PIL.Image.Resampling.BILINEAR))
        image = torch.from_numpy(scene.copy()).permute(2, 0, 1).float() / 127.5 - 1
        keep_mask = torch.from_numpy(_keep_mask(geometry, config.resolution).copy()).float()[None]
        return {"image": image, "keep_mask": keep_mask, "reference": _clip_normalise(reference)}


# ---- the loader


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's batches of one epoch, as ``(epoch, index)`` lists.

    The epoch's order is a permutation drawn from ``(seed, epoch)``. Global batch ``j`` is
    ``order[j * B : (j + 1) * B]`` with ``B = batch_size x world_size``; rank ``r`` takes its ``r``-th slice of
    ``batch_size``, so ranks ``0..N-1`` together see, step by step, exactly what one process with batch ``B`` sees.
    Without ``drop_last`` a last partial global batch is topped up from the start of the order until the ranks can
    share it equally (as ``DistributedSampler`` pads).
    """

    def __init__(self, length: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        """Iterate over ``epoch`` from now on, leaving out its first ``skip_batches`` batches (to resume a run)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if not isinstance(skip_batches, int) or not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch}] (batches per epoch), "
                             f"got {skip_batches!r}")
        self.epoch, self.skip = epoch, skip_batches

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch, skipping aside."""
        global_batch = self.batch_size * self.world_size
        return self.length // global_batch if self.drop_last else -(-self.length // global_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length).tolist()
        global_batch = self.batch_size * self.world_size
        for j in range(self.skip, self.batches_per_epoch):
            batch = order[j * global_batch:(j + 1) * global_batch]
            if len(batch) < global_batch:  # only without drop_last: top up to a multiple of world_size
                share = -(-len(batch) // self.world_size)
                batch = (batch + order * self.world_size)[:share * self.world_size]  # wraps around, however short
                per_rank = share
            else:
                per_rank = self.batch_size
            yield [(self.epoch, index) for index in batch[self.rank * per_rank:(self.rank + 1) * per_rank]]


def _worker_init(worker_id: int) -> None:
    # A worker draws pictures, not matrices: one thread each, so the workers do not fight over the cores.
    torch.set_num_threads(1)


def make_loader(dataset: PaintByExampleDataset, *, batch_size: int, workers: int, seed: int, rank: int = 0,
                world_size: int = 1, drop_last: bool = True) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches depend only on ``(seed, epoch)`` and this rank.

    Its ``batch_sampler`` is an ``EpochBatchSampler``: call ``loader.batch_sampler.set_epoch(epoch,
    skip_batches=k)`` before iterating an epoch (``k`` batches already trained when resuming). Batches are dicts of
    stacked tensors (``image``, ``keep_mask``, ``reference``); the worker count does not change them.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0), ("seed", seed, 0),
                               ("world_size", world_size, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size - 1}] for world_size {world_size}, got {rank!r}")
    global_batch = batch_size * world_size
    if drop_last and len(dataset) < global_batch:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one batch of batch_size x world_size = "
                         f"{batch_size} x {world_size} = {global_batch}")
    sampler = EpochBatchSampler(len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                                drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                      worker_init_fn=_worker_init if workers > 0 else None, pin_memory=torch.cuda.is_available())


__all__ = ["DataConfig", "EpochBatchSampler", "ManifestError", "PaintByExampleDataset", "SampleGeometry", "TrainRow",
           "draw_geometry", "make_loader", "read_manifest", "reference_augmentation"]
