"""Image input and output for Paint by Example: the only module of pbe that touches PIL.

Three conversions reproduce the reference (diffusers' ``PaintByExamplePipeline``) exactly:

* ``preprocess_example``: the example image as the CLIP vision tower sees it, equal to transformers'
  ``CLIPImageProcessor`` with the official config (PIL backend, see the function's docstring).
* ``prepare_image_and_mask``: the image to edit in [-1, 1] and the ``keep_mask`` (1 = keep), as diffusers'
  ``prepare_mask_and_masked_image``; the caller forms ``masked_image = image * keep_mask``.
* ``to_numpy`` / ``to_pil``: decoded images in [0, 1] to arrays and PIL images, as ``VaeImageProcessor.postprocess``.

Beyond the reference: ``load_image`` with clear errors, ``pad_to_multiple`` / ``crop`` for sizes that are not a
multiple of 8, and ``paste_back`` to keep the unmasked pixels exactly (optionally with a feathered seam).

Every image a user has, read the same way by the API and the CLI (where the reference differs, it is wrong for these
inputs; for 8-bit, upright, opaque inputs nothing changes):

* EXIF orientation is applied to every PIL input (image, mask, example), whether opened by ``load_image`` or not.
* 16-bit and float images are scaled to 8 bits instead of clipped (``to_8bit``); Pillow turns a 16-bit PNG white.
* A mask with transparency is read composited over black: transparent = keep, opaque white = repaint (an RGBA mask
  whose strokes live only in the alpha channel repaints the strokes, not the whole picture).

Mask vocabulary: the user's mask is a ``repaint_mask`` (white / 1 = paint here); the model consumes its inverse, the
``keep_mask`` (1 = keep). Every public function names which one it takes or returns.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

CLIP_IMAGE_SIZE = 224  # side of the square CLIP ViT-L/14 input
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, per RGB channel
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers multiplies by this double (1/255 rounded once), which is not always bit-equal to dividing by 255.
_RESCALE_FACTOR = 1 / 255

PixelImage = PIL.Image.Image | np.ndarray
ImageInput = PixelImage | Sequence[PixelImage] | torch.Tensor


# --------------------------------------------------------------------------------------------------------------------
# Helpers for error messages and input lists
# --------------------------------------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    """A short description of an input for error messages: type, and shape/dtype or mode/size."""
    if isinstance(value, torch.Tensor):
        return f"torch.Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"numpy.ndarray of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, PIL.Image.Image):
        return f"PIL image of mode {value.mode!r} and size {value.width}x{value.height} (width x height)"
    return f"object of type {type(value).__name__}"


def _as_list(value: object, *, name: str, single_ndims: tuple[int, ...], batch_ndim: int) -> list[PixelImage]:
    """Turn one PIL image / array, a batch array or a list of them into a non-empty list of single images.

    An array with a dimension count in ``single_ndims`` is one image; one with ``batch_ndim`` is a batch.
    """
    if isinstance(value, PIL.Image.Image):
        return [value]
    if isinstance(value, np.ndarray):
        if value.ndim in single_ndims:
            return [value]
        if value.ndim == batch_ndim:
            return list(value)
        raise ValueError(
            f"`{name}` as a numpy array must have {' or '.join(map(str, single_ndims))} dimensions (one image) or "
            f"{batch_ndim} (a batch), got {_describe(value)}"
        )
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"`{name}` is an empty {type(value).__name__}: expected at least one image")
        for index, item in enumerate(value):
            if not isinstance(item, (PIL.Image.Image, np.ndarray)):
                raise TypeError(f"`{name}[{index}]` must be a PIL image or a numpy array, got {_describe(item)}")
            if isinstance(item, np.ndarray) and item.ndim not in single_ndims:
                raise ValueError(
                    f"`{name}[{index}]` as a numpy array must have {' or '.join(map(str, single_ndims))} dimensions, "
                    f"got {_describe(item)}"
                )
        return list(value)
    raise TypeError(
        f"`{name}` must be a PIL image, a numpy array, a list of those or a torch.Tensor, got {_describe(value)}"
    )


def _check_finite_range(tensor: torch.Tensor, *, name: str, low: float, high: float) -> None:
    """Raise ValueError if ``tensor`` holds NaN/inf or values outside [low, high]."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or infinite values ({_describe(tensor)})")
    if tensor.numel() and (tensor.min() < low or tensor.max() > high):
        raise ValueError(
            f"`{name}` must be in [{low:g}, {high:g}], got values in "
            f"[{tensor.min().item():g}, {tensor.max().item():g}] ({_describe(tensor)})"
        )


# --------------------------------------------------------------------------------------------------------------------
# Every image a user has: orientation, bit depth, transparency
# --------------------------------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # unsigned 16-bit greyscale (PNG, TIFF)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # modes with an alpha band ("RGBa", "La": premultiplied)


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` turned the way its EXIF (or XMP) orientation tag says it is displayed.

    The returned image carries no orientation tag any more, so applying this twice is the same as once: every PIL
    input of pbe passes through here, including those already opened by ``load_image``.
    """
    return PIL.ImageOps.exif_transpose(image)


def _array_to_uint8(array: np.ndarray, *, name: str) -> np.ndarray:
    """uint8 as is; uint16 to ``round(x / 257)`` (65535 -> 255); float in [0, 1] to ``round(x * 255)``."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order
        # round(x / 257) in integers: the exact inverse of the 8 -> 16 bit widening v * 257.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if array.dtype.kind == "f":
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError(
                f"`{name}` as a float array must be in [0, 1], got values in [{np.nanmin(array):g}, "
                f"{np.nanmax(array):g}] ({_describe(array)}); divide a 0..255 array by 255 or cast it to uint8"
            )
        return np.round(array * np.float32(255)).astype(np.uint8)
    raise TypeError(f"`{name}` as a numpy array must be uint8, uint16 or float in [0, 1], got {_describe(array)}")


def _pil_to_8bit(image: PIL.Image.Image, *, name: str) -> PIL.Image.Image:
    """Wide single-band modes to "L" without clipping (see ``to_8bit``); other modes are returned as they are."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return PIL.Image.fromarray(_array_to_uint8(np.asarray(image), name=name))
    if image.mode not in ("I", "F") or image.width == 0 or image.height == 0:
        return image
    values = np.asarray(image)
    low, high = values.min(), values.max()
    if image.mode == "F" and 0 <= low and high <= 1:  # NaN fails every comparison and falls through to the error
        return PIL.Image.fromarray(_array_to_uint8(values, name=name))
    if 0 <= low and high <= 255:
        # 8-bit data in a wide mode (what Pillow's convert("I") / convert("F") make): Pillow's own reading.
        return image.convert("L")
    if image.mode == "I" and 0 <= low and high <= 65535:
        return PIL.Image.fromarray(_array_to_uint8(values.astype(np.uint16), name=name))
    understood = "[0, 1] or [0, 255]" if image.mode == "F" else "[0, 255] or [0, 65535]"
    raise ValueError(
        f"`{name}`: cannot tell the brightness scale of a {_describe(image)} with values in [{low:g}, {high:g}]; "
        f"values in {understood} are understood: rescale it to one of those first"
    )


def to_8bit(image: PixelImage, *, name: str = "image") -> PixelImage:
    """An image with 8 bits per channel, scaled rather than clipped (Pillow's own conversion clips wide modes).

    * PIL "I;16" (and its byte orders): ``round(x / 257)``, so 65535 is white. A 16-bit PNG opens in this mode.
    * PIL "I" (32-bit integers): values in [0, 255] as they are (what ``convert("I")`` of an 8-bit image makes),
      else values in [0, 65535] as 16-bit (older Pillow opened 16-bit PNGs as "I").
    * PIL "F" (32-bit float): values in [0, 1] times 255, rounded (the float image convention); else values in
      [0, 255] read as Pillow reads them (what ``convert("F")`` of an 8-bit image makes).
    * numpy arrays: uint8 as is, uint16 as "I;16", float in [0, 1] as "F" in [0, 1]; no 0..255 float arrays.

    The ranges overlap only for nearly black images (a 16-bit image with no value above 255, i.e. below 0.4%
    brightness, or a 0..255 float image with no value above 1), which are read at the narrower scale.
    Other PIL modes are returned unchanged (Pillow reads 16-bit colour PNGs as 8-bit "RGB"/"RGBA" already).

    Raises:
        ValueError: values outside every range understood (negative, NaN, or above the widest scale).
        TypeError: a numpy array of another dtype.
    """
    if isinstance(image, PIL.Image.Image):
        return _pil_to_8bit(image, name=name)
    if isinstance(image, np.ndarray):
        return _array_to_uint8(image, name=name)
    raise TypeError(f"`{name}` must be a PIL image or a numpy array, got {_describe(image)}")


def _has_transparency(image: PIL.Image.Image) -> bool:
    """An alpha band, or a transparent colour / palette index (P, L and RGB images may carry one in ``info``)."""
    return image.mode in _ALPHA_MODES or image.info.get("transparency") is not None


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_image(path_or_image: str | os.PathLike[str] | PIL.Image.Image, *, mode: str | None = None) -> PIL.Image.Image:
    """Open an image file (or take a PIL image) and turn it upright according to its EXIF orientation.

    Like ``diffusers.utils.load_image`` except that the mode is kept unless ``mode`` is given: each consumer then
    applies its own reference conversion (``preprocess_example`` composites transparency onto white as CLIP's
    processor does, ``prepare_image_and_mask`` converts to "RGB" / "L" as diffusers does).

    Raises:
        FileNotFoundError: the path does not name an existing file.
        IsADirectoryError: the path names a folder.
        OSError: the file exists but cannot be decoded as an image (the message names the path).
        TypeError: ``path_or_image`` is neither a path nor a PIL image.
    """
    if isinstance(path_or_image, PIL.Image.Image):
        image = upright(path_or_image)
    elif isinstance(path_or_image, (str, os.PathLike)):
        path = os.fspath(path_or_image)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path!r} is a folder, expected a picture file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()  # decode now, so a truncated file fails here and not later
                image = upright(opened)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise OSError(f"cannot read image file {path!r}: {error}") from error
    else:
        raise TypeError(f"`path_or_image` must be a file path or a PIL image, got {_describe(path_or_image)}")
    return image.convert(mode) if mode is not None else image


# --------------------------------------------------------------------------------------------------------------------
# The example image: CLIP preprocessing
# --------------------------------------------------------------------------------------------------------------------


def _example_to_rgb(image: PixelImage, *, name: str) -> PIL.Image.Image:
    """Upright, 8-bit, then transformers' ``convert_to_rgb`` (transparency is composited onto white)."""
    if isinstance(image, PIL.Image.Image):
        image = to_8bit(upright(image), name=name)
        # Reference quirk: "has alpha" is tested by a band named "A", so the a* band of a "LAB" image counts too.
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if not has_alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")

    image = to_8bit(image, name=name)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[-1]
    if channels == 1:
        rgb = np.repeat(image, 3, axis=-1)
    elif channels == 3:
        rgb = image
    elif channels == 4:
        # transformers' numpy path blends in float64 and rounds (PIL's alpha_composite rounds differently).
        alpha = image[..., 3:4] / 255
        rgb = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    else:
        raise ValueError(f"`{name}` as a numpy array must be HxW or HxWxC with C in (1, 3, 4), got {_describe(image)}")
    return PIL.Image.fromarray(np.ascontiguousarray(rgb))


def _clip_pixels(rgb: PIL.Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), center-crop ``size`` x ``size``, rescale and normalise."""
    width, height = rgb.size
    short, long = min(width, height), max(width, height)
    # Reference quirk: the long side is floored, int(size * long / short), never rounded.
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    resized = rgb.resize((new_width, new_height), resample=PIL.Image.Resampling.BICUBIC)

    # Crop offsets are floored: an odd surplus leaves the extra pixel at the bottom/right.
    top, left = (new_height - size) // 2, (new_width - size) // 2
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)))

    # (H, W, 3) uint8 -> (3, H, W) float32; rescale in float64 then normalise in float32, as transformers does.
    pixels = torch.from_numpy(cropped.copy()).permute(2, 0, 1).to(torch.float64) * _RESCALE_FACTOR
    pixels = pixels.to(torch.float32)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def preprocess_example(example_image: ImageInput, *, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """The example image(s) as normalised CLIP pixel values, shape (B, 3, size, size), float32.

    Equal to transformers 5's PIL-backend ``CLIPImageProcessorPil`` with the official Paint-by-Example config
    (which is what ``CLIPImageProcessor`` resolves to when torchvision is absent; with torchvision installed,
    ``CLIPImageProcessor`` is a different, torchvision-based resize that this function does NOT follow):
    RGB conversion (transparency composited onto white), short side resized to ``size`` with PIL bicubic and the long
    side floored to ``int(size * long / short)``, center crop with floored offsets, ``x * (1/255)`` then
    ``(x - mean) / std`` with the OpenAI CLIP mean/std.

    Accepts a PIL image of any mode Pillow can convert to RGB, a numpy array (HxW, HxWx1, HxWx3, HxWx4, always
    channels-last; a 4-D array is a batch), or a list of those. A torch.Tensor is taken as already
    preprocessed pixel values (as in diffusers): shape (3, size, size) or (B, 3, size, size), returned as float32.

    Beyond the reference: PIL images are turned upright (``upright``) and 16-bit / float images and arrays are scaled
    to 8 bits (``to_8bit``) where transformers would clip them; 8-bit upright images give exactly its result.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive int, got {size!r}")
    if isinstance(example_image, torch.Tensor):
        pixels = example_image.unsqueeze(0) if example_image.ndim == 3 else example_image
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`example_image` as a torch.Tensor must be preprocessed CLIP pixel values of shape "
                f"(3, {size}, {size}) or (B, 3, {size}, {size}), got {_describe(example_image)}"
            )
        if not pixels.is_floating_point():
            raise TypeError(f"`example_image` as a torch.Tensor must be floating point, got {_describe(example_image)}")
        if not torch.isfinite(pixels).all():
            raise ValueError(f"`example_image` contains NaN or infinite values ({_describe(example_image)})")
        return pixels.to(torch.float32)

    images = _as_list(example_image, name="example_image", single_ndims=(2, 3), batch_ndim=4)
    processed = []
    for index, image in enumerate(images):
        item_name = "example_image" if len(images) == 1 else f"example_image[{index}]"
        rgb = _example_to_rgb(image, name=item_name)
        if rgb.width == 0 or rgb.height == 0:
            raise ValueError(f"`{item_name}` is empty: {_describe(image)}")
        processed.append(_clip_pixels(rgb, size))
    return torch.stack(processed)


# --------------------------------------------------------------------------------------------------------------------
# The image to edit and its mask
# --------------------------------------------------------------------------------------------------------------------


def _keep_from_repaint(repaint_mask: torch.Tensor) -> torch.Tensor:
    """Invert the user's mask and binarise it at 0.5, in the mask's own floating dtype; returns float32."""
    # Reference quirk: the model was trained with 1 = keep, so the user's mask (1 = repaint) is inverted.
    keep_mask = 1 - repaint_mask
    return (keep_mask >= 0.5).to(torch.float32)


def _image_from_tensor(image: torch.Tensor) -> torch.Tensor:
    """Validate a tensor image in [-1, 1], (3, H, W) or (B, 3, H, W); returns (B, 3, H, W) float32."""
    if not image.is_floating_point():
        raise TypeError(f"`image` as a torch.Tensor must be floating point in [-1, 1], got {_describe(image)}")
    batched = image.unsqueeze(0) if image.ndim == 3 else image
    if batched.ndim != 4 or batched.shape[1] != 3:
        raise ValueError(f"`image` as a torch.Tensor must have shape (3, H, W) or (B, 3, H, W), got {_describe(image)}")
    _check_finite_range(batched, name="image", low=-1.0, high=1.0)
    return batched.to(torch.float32)


def _repaint_mask_from_tensor(mask_image: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """Validate a tensor mask in [0, 1] (1 = repaint) and bring it to (N, 1, H, W), N = batch_size or 1.

    Shape rules of diffusers: (H, W) is one mask; (N, H, W) is N masks if N equals the image batch size, else it
    must be (1, H, W), one mask; (N, 1, H, W) is N masks.
    """
    if not mask_image.is_floating_point():
        mask = mask_image.to(torch.float32)  # booleans and integer 0/1 masks
    else:
        mask = mask_image
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        if mask.shape[0] not in (batch_size, 1):
            raise ValueError(
                f"`mask_image` of shape (N, H, W) must hold one mask per image (N = {batch_size}) or a single mask "
                f"(N = 1), got {_describe(mask_image)}"
            )
        mask = mask.unsqueeze(1)
    elif mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"`mask_image` as a torch.Tensor must have shape (H, W), (N, H, W) or (N, 1, H, W), got "
            f"{_describe(mask_image)}"
        )
    _check_finite_range(mask, name="mask_image", low=0.0, high=1.0)
    return mask


def _image_from_pixels(image: PixelImage | Sequence[PixelImage]) -> torch.Tensor:
    """PIL images (upright, 8-bit, then RGB) or HxWx3 arrays (via ``to_8bit``) -> (B, 3, H, W) float32 in [-1, 1]."""
    items = _as_list(image, name="image", single_ndims=(3,), batch_ndim=4)
    arrays = []
    for index, item in enumerate(items):
        item_name = "image" if len(items) == 1 else f"image[{index}]"
        if isinstance(item, PIL.Image.Image):
            array = np.asarray(to_8bit(upright(item), name=item_name).convert("RGB"))
        elif item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(
                f"`{item_name}` as a numpy array must have shape (H, W, 3) (or (B, H, W, 3) for a batch), "
                f"got {_describe(item)}"
            )
        else:
            array = to_8bit(item, name=item_name)
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(
                f"all images in `image` must have the same size: `image[0]` is {arrays[0].shape[:2]} (H, W) but "
                f"`{item_name}` is {array.shape[:2]}"
            )
        arrays.append(array)
    # (B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels.to(torch.float32) / 127.5 - 1.0


def _repaint_mask_from_pil(mask_image: PIL.Image.Image, *, name: str) -> torch.Tensor:
    """One PIL mask -> (H, W) float32 in [0, 1], 1 = repaint: upright, 8-bit, grey, composited over black."""
    mask_image = to_8bit(upright(mask_image), name=name)
    if not _has_transparency(mask_image):
        return torch.from_numpy(np.array(mask_image.convert("L"))).to(torch.float32) / 255.0
    # Over black, a pixel's grey value is scaled by its opacity: transparent = 0 = keep, whatever its colour.
    # Premultiplied modes and transparent palette indices / colours become a plain alpha band through "RGBA".
    rgba = mask_image.convert("RGBA")
    grey = torch.from_numpy(np.array(rgba.convert("L"))).to(torch.float32) / 255.0  # "RGBA" -> "L" ignores alpha
    alpha = torch.from_numpy(np.array(rgba.getchannel("A"))).to(torch.float32) / 255.0
    return grey * alpha  # opaque (alpha = 1.0 exactly): the reference's grey value, bit for bit


def _repaint_mask_from_pixels(mask_image: PixelImage | Sequence[PixelImage]) -> torch.Tensor:
    """PIL masks or HxW arrays -> (N, 1, H, W) float32 in [0, 1], 1 = repaint.

    PIL masks: upright, 8-bit, grey ("L"), composited over black if they have transparency. uint8 arrays are read
    like an "L" image (0..255, divided by 255), uint16 arrays like an "I;16" one (via ``to_8bit``); float arrays must
    already be in [0, 1]; bool arrays are True = repaint.
    """
    items = _as_list(mask_image, name="mask_image", single_ndims=(2,), batch_ndim=3)
    masks = []
    for index, item in enumerate(items):
        item_name = "mask_image" if len(items) == 1 else f"mask_image[{index}]"
        if isinstance(item, PIL.Image.Image):
            mask = _repaint_mask_from_pil(item, name=item_name)
        elif item.dtype == np.uint8 or (item.dtype.kind == "u" and item.dtype.itemsize == 2):
            mask = torch.from_numpy(np.array(to_8bit(item, name=item_name))).to(torch.float32) / 255.0
        elif item.dtype == np.bool_ or np.issubdtype(item.dtype, np.floating):
            mask = torch.from_numpy(np.array(item, dtype=np.float32))
            _check_finite_range(mask, name=item_name, low=0.0, high=1.0)
        else:
            raise TypeError(
                f"`{item_name}` as a numpy array must be uint8, uint16, bool or float, got {_describe(item)}"
            )
        if masks and mask.shape != masks[0].shape:
            raise ValueError(
                f"all masks in `mask_image` must have the same size: `mask_image[0]` is {tuple(masks[0].shape)} "
                f"(H, W) but `{item_name}` is {tuple(mask.shape)}"
            )
        masks.append(mask)
    return torch.stack(masks).unsqueeze(1)


def read_repaint_mask(mask_image: PixelImage | Sequence[PixelImage]) -> torch.Tensor:
    """The user's mask(s) as ``prepare_image_and_mask`` reads them, before inversion and binarisation.

    Returns (N, 1, H, W) float32 in [0, 1], 1 = repaint; ``prepare_image_and_mask`` repaints where it is > 0.5.
    Takes what ``prepare_image_and_mask`` takes for ``mask_image`` except tensors (which need no reading); useful to
    warn about a mask that repaints nothing before any model is loaded.
    """
    return _repaint_mask_from_pixels(mask_image)


def prepare_image_and_mask(image: ImageInput, mask_image: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
    """The image to edit and its keep mask, as diffusers' ``prepare_mask_and_masked_image`` makes them.

    Returns ``(keep_mask, image)``: ``keep_mask`` (B, 1, H, W) float32 in {0, 1} with 1 = keep, and ``image``
    (B, 3, H, W) float32 in [-1, 1]. The caller forms ``masked_image = image * keep_mask``.

    Inputs, either both tensors or both not:

    * PIL images (or lists of them): image -> "RGB" -> ``x / 127.5 - 1``; mask -> "L" -> ``/ 255``, white = repaint.
      Beyond diffusers, both are first turned upright (EXIF orientation) and scaled to 8 bits (``to_8bit``), and a
      mask with transparency is composited over black (transparent = keep, opaque white = repaint); for upright
      8-bit opaque inputs this is diffusers' result exactly.
      numpy arrays are also taken: image (H, W, 3) or (B, H, W, 3), uint8, uint16 or float in [0, 1]; mask (H, W)
      or (N, H, W), uint8 read like an "L" image, uint16 like an "I;16" one, float in [0, 1], or bool. PIL images
      and arrays may be mixed. (diffusers' docstring promises numpy input but its code only handles PIL, so these
      array rules are pbe's own.)
    * tensors: image in [-1, 1], (3, H, W) or (B, 3, H, W); mask in [0, 1] with 1 = repaint, (H, W), (N, H, W) or
      (N, 1, H, W) with diffusers' shape rules (an (N, H, W) mask is a batch if N = B, else it must be (1, H, W)).
      The image must be floating point; bool and integer 0/1 masks are accepted as float32.

    Then the mask is inverted and binarised at 0.5 (so a repaint value of exactly 0.5 is kept).
    Beyond diffusers: a single mask serves a whole batch of images (the diffusers pipeline repeats one PIL mask
    the same way later, its tensor path rejects it), and NaN values raise instead of passing the range check.

    Raises:
        TypeError: one of the two is a tensor and the other is not, or an unsupported type / dtype.
        ValueError: wrong shape or channel count, values out of range or NaN, images of different sizes,
            image and mask sizes that differ, or mask and image counts that differ (other than one mask).
    """
    image_is_tensor, mask_is_tensor = isinstance(image, torch.Tensor), isinstance(mask_image, torch.Tensor)
    if image_is_tensor and not mask_is_tensor:
        raise TypeError(
            f"`image` is a torch.Tensor but `mask_image` is a {_describe(mask_image)}: pass both as tensors or neither"
        )
    if mask_is_tensor and not image_is_tensor:
        raise TypeError(
            f"`mask_image` is a torch.Tensor but `image` is a {_describe(image)}: pass both as tensors or neither"
        )

    if image_is_tensor:
        pixels = _image_from_tensor(image)
        repaint_mask = _repaint_mask_from_tensor(mask_image, batch_size=pixels.shape[0])
    else:
        pixels = _image_from_pixels(image)
        repaint_mask = _repaint_mask_from_pixels(mask_image)

    if pixels.shape[-2:] != repaint_mask.shape[-2:]:
        raise ValueError(
            f"`image` and `mask_image` must have the same size, got (H, W) = {tuple(pixels.shape[-2:])} for `image` "
            f"and {tuple(repaint_mask.shape[-2:])} for `mask_image`"
        )
    batch_size, mask_count = pixels.shape[0], repaint_mask.shape[0]
    if mask_count not in (batch_size, 1):
        raise ValueError(
            f"`mask_image` holds {mask_count} masks but `image` holds {batch_size} images: pass one mask per image "
            f"or a single mask for all of them"
        )

    keep_mask = _keep_from_repaint(repaint_mask)
    if mask_count != batch_size:
        keep_mask = keep_mask.expand(batch_size, -1, -1, -1).contiguous()
    return keep_mask, pixels


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


def _check_output_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`images` must be a torch.Tensor of shape (B, 3, H, W), got {_describe(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must have shape (B, 3, H, W), got {_describe(images)}")
    _check_finite_range(images, name="images", low=0.0, high=1.0)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) images in [0, 1] -> (B, H, W, 3) float32 array (diffusers' ``VaeImageProcessor.pt_to_numpy``)."""
    _check_output_images(images)
    return images.detach().cpu().permute(0, 2, 3, 1).float().numpy()


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) images in [0, 1] -> B RGB PIL images, ``uint8 = round(x * 255)`` (diffusers' ``numpy_to_pil``)."""
    arrays = (to_numpy(images) * 255).round().astype("uint8")
    return [PIL.Image.fromarray(array) for array in arrays]


# --------------------------------------------------------------------------------------------------------------------
# Beyond diffusers: padding to a multiple of 8 and pasting the kept pixels back
# --------------------------------------------------------------------------------------------------------------------


def pad_to_multiple(
    image: torch.Tensor, keep_mask: torch.Tensor, multiple: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``image`` (B, C, H, W) and ``keep_mask`` (B, 1, H, W) at the bottom/right to a multiple of ``multiple``.

    The image is padded by replicating its last row/column; the padded area of the mask is 1 (keep), so the model
    is not asked to paint it. Returns ``(image, keep_mask)``; to undo, record ``original_size = image.shape[-2:]``
    before padding and call ``crop(images, original_size)``. When H and W are already multiples, the same tensor
    objects are returned.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"`multiple` must be a positive int, got {multiple!r}")
    if image.ndim != 4:
        raise ValueError(f"`image` must have shape (B, C, H, W), got {_describe(image)}")
    if keep_mask.ndim != 4 or keep_mask.shape[1] != 1 or keep_mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"`keep_mask` must have shape (B, 1, H, W) with the H, W of `image` {tuple(image.shape[-2:])}, "
            f"got {_describe(keep_mask)}"
        )
    height, width = image.shape[-2:]
    pad_bottom, pad_right = -height % multiple, -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image, keep_mask
    padding = (0, pad_right, 0, pad_bottom)  # F.pad order: (left, right, top, bottom)
    padded_image = F.pad(image, padding, mode="replicate")
    padded_keep_mask = F.pad(keep_mask, padding, mode="constant", value=1.0)
    return padded_image, padded_keep_mask


def crop(images: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Undo ``pad_to_multiple``: keep the top-left ``original_size`` = (H, W) of ``images`` (..., H', W')."""
    height, width = original_size
    if images.ndim < 2 or height > images.shape[-2] or width > images.shape[-1] or height < 1 or width < 1:
        raise ValueError(
            f"`original_size` {tuple(original_size)} must be positive and fit in `images` ({_describe(images)})"
        )
    return images[..., :height, :width]


def _gaussian_blur(masks: torch.Tensor, *, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) masks, kernel width 2 * radius + 1, replicate padding at borders."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=masks.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(masks.dtype)
    padded = F.pad(masks, (radius, radius, radius, radius), mode="replicate")
    # (B, 1, H + 2r, W + 2r) -> (B, 1, H, W + 2r) -> (B, 1, H, W)
    blurred = F.conv2d(padded, kernel.view(1, 1, -1, 1))
    return F.conv2d(blurred, kernel.view(1, 1, 1, -1))


def paste_back(
    generated: torch.Tensor, original: torch.Tensor, keep_mask: torch.Tensor, *, blur_radius: float = 0.0
) -> torch.Tensor:
    """Put the original pixels back outside the repaint region: ``alpha * generated + (1 - alpha) * original``.

    ``generated`` and ``original`` are (B, 3, H, W) in [0, 1]; ``keep_mask`` is (B or 1, 1, H, W), 1 = keep.
    ``alpha`` is the repaint mask ``1 - keep_mask``; where it is exactly 0 the result is exactly ``original``,
    where it is exactly 1 exactly ``generated`` (selected, not blended, so no rounding creeps in).

    With ``blur_radius`` = sigma > 0 the seam is feathered: ``alpha`` is the repaint mask blurred with a Gaussian of
    standard deviation ``blur_radius`` truncated at r = ceil(3 sigma), so the blend straddles the mask edge. A pixel
    whose (2r + 1)^2 window holds no repaint pixel stays exactly ``original``; one whose window holds no keep pixel is
    exactly ``generated``; only the band of width r on each side of the edge is blended.
    """
    if generated.shape != original.shape or generated.ndim != 4:
        raise ValueError(
            f"`generated` and `original` must have the same shape (B, 3, H, W), got {_describe(generated)} and "
            f"{_describe(original)}"
        )
    if keep_mask.ndim != 4 or keep_mask.shape[1] != 1 or keep_mask.shape[-2:] != generated.shape[-2:] or (
        keep_mask.shape[0] not in (1, generated.shape[0])
    ):
        raise ValueError(
            f"`keep_mask` must have shape (B or 1, 1, H, W) matching `generated` {tuple(generated.shape)}, "
            f"got {_describe(keep_mask)}"
        )
    if not math.isfinite(blur_radius) or blur_radius < 0:
        raise ValueError(f"`blur_radius` must be a finite number >= 0, got {blur_radius!r}")

    keep_mask = keep_mask.to(device=generated.device, dtype=torch.float32)  # mask arithmetic in float32
    alpha = 1 - keep_mask
    if blur_radius > 0:
        radius = math.ceil(3 * blur_radius)
        blurred = _gaussian_blur(alpha, sigma=blur_radius, radius=radius).clamp(0, 1)
        # Max-pooling finds which windows touch each region, exactly (the blur's sums may round to 0.9999999).
        touches_repaint = F.max_pool2d(alpha, 2 * radius + 1, stride=1, padding=radius) > 0
        touches_keep = F.max_pool2d(keep_mask, 2 * radius + 1, stride=1, padding=radius) > 0
        alpha = torch.where(touches_repaint, torch.where(touches_keep, blurred, 1.0), 0.0)

    alpha = alpha.to(generated.dtype)
    blended = alpha * generated + (1 - alpha) * original
    return torch.where(alpha == 0, original, torch.where(alpha == 1, generated, blended))
