"""CLIP ViT-B/32 image features of pictures, prepared as the official eval code prepares them, batched and cached.

Three ways of preparing a picture, each the official ``eval_tool/``'s (OpenAI ``clip`` with torchvision 0.12):
- ``clip_preprocess`` (FID and QS, results and real pictures alike): OpenAI CLIP's ``preprocess``, i.e. resize the
  short side to 224 (PIL bicubic, long side floored), centre-crop 224 with ROUNDED offsets, RGB, ``/255``, normalise.
- ``region_crop`` (CLIP score, the result): the whole result normalised, cropped to the mask's box, resized to
  224 x 224 as a tensor (bilinear, no antialiasing).
- ``reference_pixels`` (CLIP score, the reference): PIL ``resize((224, 224))`` with Pillow's default filter, RGB,
  normalised.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weights_convert.clip_features import convert_clip_features, expected_config

from ..files import write_atomically
from ..images import CLIP_MEAN, CLIP_STD
from ..model import CLIPFeaturesConfig, CLIPImageFeatures
from .metrics import box_from_mask

CLIP_SIZE = 224  # CLIP ViT-B/32's input side
CACHE_VERSION = "1"  # part of every cache key: bump when the preparation of pictures changes


def _normalised(rgb: PIL.Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor`` then ``Normalize`` with CLIP's mean and std: (3, H, W) float32."""
    pixels = torch.from_numpy(np.array(rgb, np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def clip_preprocess(image: PIL.Image.Image, *, size: int = CLIP_SIZE) -> torch.Tensor:
    """OpenAI CLIP's ``preprocess`` of one picture: (3, size, size) float32 (see the module docstring)."""
    width, height = image.size
    if min(width, height) != size:  # torchvision returns a picture whose short side is already ``size`` as it is
        new = (size, int(size * height / width)) if width < height else (int(size * width / height), size)
        image = image.resize(new, PIL.Image.Resampling.BICUBIC)
        width, height = new
    # Reference quirk: torchvision's CenterCrop ROUNDS its offsets (round half to even), where CLIPImageProcessor
    # (Paint by Example's own example preprocessing) floors them.
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return _normalised(image.crop((left, top, left + size, top + size)).convert("RGB"))


def region_crop(result: PIL.Image.Image, mask: PIL.Image.Image, *, size: int = CLIP_SIZE) -> torch.Tensor:
    """The result inside the mask's box, as the official CLIP score crops it: (3, size, size) float32.

    ``mask``: white (255) inside the box, read as 8-bit grey; it must have the result's size.
    """
    if mask.size != result.size:
        raise ValueError(f"mask of {mask.size[0]}x{mask.size[1]} for a result of {result.size[0]}x{result.size[1]}")
    top, left, bottom, right = box_from_mask(np.asarray(mask.convert("L")))
    cropped = _normalised(result.convert("RGB"))[:, top:bottom, left:right]
    # torchvision 0.12's Resize on a tensor: bilinear, half-pixel centres, no antialiasing.
    return F.interpolate(cropped[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def reference_pixels(reference: PIL.Image.Image, *, size: int = CLIP_SIZE) -> torch.Tensor:
    """The reference as the official CLIP score reads it: squashed to size x size, then RGB; (3, size, size)."""
    # Reference quirk: no aspect-preserving crop, and Pillow's default filter (bicubic for RGB, nearest for "P").
    return _normalised(reference.resize((size, size)).convert("RGB"))


def open_picture(path: str | os.PathLike[str]) -> PIL.Image.Image:
    """A picture file, decoded (not turned upright: the official code does not read EXIF orientation)."""
    with PIL.Image.open(path) as image:
        image.load()
        return image


# ---- the network -----------------------------------------------------------------------------------------------------


def load_clip_features(checkpoint: str | os.PathLike[str], *, config: CLIPFeaturesConfig | None = None,
                       device: str | torch.device = "cpu") -> CLIPImageFeatures:
    """CLIP's image-feature network from a transformers ``CLIPModel`` folder or weights file (the paper's metrics:
    ``openai/clip-vit-base-patch32``), in float32 and eval mode on ``device``.

    ``config``: the model expected; None: the folder's config.json (a bare file: ViT-B/32). A checkpoint of another
    size is refused (``CheckpointError``).
    """
    config, state_dict = convert_clip_features(checkpoint, config=config, name="clip")
    with torch.device("meta"):
        model = CLIPImageFeatures(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.float().eval().to(device)


def clip_config(checkpoint: str | os.PathLike[str]) -> CLIPFeaturesConfig:
    """The model ``load_clip_features(checkpoint)`` builds, read without its weights (``CheckpointError`` as there)."""
    return expected_config(checkpoint, name="clip")


@torch.no_grad()
def extract_features(model: CLIPImageFeatures, prepare: Sequence[Callable[[], torch.Tensor]], *,
                     batch_size: int = 50, desc: str | None = None) -> np.ndarray:
    """The features of the pictures ``prepare[i]()`` returns, ``batch_size`` at a time: [N, D] float64.

    ``desc``: the progress bar's label (no bar when None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive count, got {batch_size}")
    device = model.projection.weight.device
    out = np.empty((len(prepare), model.config.projection_dim), np.float64)
    starts = range(0, len(prepare), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
        batch = torch.stack([p() for p in prepare[start:start + batch_size]]).to(device)
        out[start:start + len(batch)] = model(batch).double().cpu().numpy()
    return out


# ---- the cache ---------------------------------------------------------------------------------------------------


def model_identity(checkpoint: str | os.PathLike[str]) -> str:
    """What names a checkpoint for the cache: its resolved path, and the size and time of each file in it."""
    path = Path(checkpoint).expanduser().resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return json.dumps([str(path), *[(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]])


def cache_key(kind: str, model: str, files: Sequence[Sequence[Path]]) -> str:
    """A digest of what features depend on: the preparation ``kind``, the model, each input file's path, size and
    modification time (a rewritten picture misses the cache)."""
    stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for group in files for p in group]
    text = json.dumps([CACHE_VERSION, kind, model, stamp])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached(path: Path | None, names: Sequence[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The features cached at ``path`` if it holds them for ``names``, else ``compute()``, then written there
    atomically (``path`` None: no cache)."""
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if list(data["names"]) == list(names):
                return data["features"]
    features = compute()
    if path is not None:
        write_atomically(path, lambda tmp: _save(tmp, features, names))
    return features


def _save(tmp: str, features: np.ndarray, names: Sequence[str]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, features=features, names=np.array(list(names), dtype=str))
