"""pbe's native checkpoint, and what every checkpoint reader shares: the networks it holds, the safetensors reader.

The native file is ONE ``.safetensors`` file holding all three networks, configs in its metadata. Keys are
``unet.*``, ``vae.*`` and ``image_encoder.*`` in pbe's own names. Writing is atomic (a temporary file in the same
folder, then a rename), so a failure never leaves half a file under the final name.

This module sits below the converter (``weights_convert``) and the loader (``pbe.loading``): it imports only
``pbe.model``, ``pbe.errors`` and ``pbe.files``.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import functools
import json
import mmap
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError
from .files import write_atomically
from .model import AutoencoderKL, ImageEncoder, UNet
from .model.config import AutoencoderConfig, CLIPVisionConfig, ImageEncoderConfig, PaintByExampleConfig, UNetConfig

__all__ = ["DTYPES", "NETWORK_CLASSES", "NETWORK_NAMES", "CheckpointError", "cast_tensors", "config_from_json",
           "config_to_json",
           "is_native", "meta_network", "read_native", "read_safetensors", "save_native"]

FORMAT = "pbe"
FORMAT_VERSION = "1"
# The three networks of a checkpoint, by the name that is both their key prefix and their PaintByExampleConfig field.
NETWORK_CLASSES: dict[str, type[nn.Module]] = {"unet": UNet, "vae": AutoencoderKL, "image_encoder": ImageEncoder}
NETWORK_NAMES = tuple(NETWORK_CLASSES)
# The dtype names the commands take, for network precision (``pbe paint``) and written tensors (``pbe convert``).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def meta_network(name: str, config: PaintByExampleConfig) -> nn.Module:
    """One of the three networks built on the meta device: its parameter names and shapes, and no memory."""
    with torch.device("meta"):
        return NETWORK_CLASSES[name](getattr(config, name))


def config_to_json(config: PaintByExampleConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> PaintByExampleConfig:
    raw = json.loads(text)
    unet = raw["unet"]
    unet = UNetConfig(**{**unet, "channels": tuple(unet["channels"]), "cross_attention": tuple(unet["cross_attention"])})
    vae = AutoencoderConfig(**{**raw["vae"], "channels": tuple(raw["vae"]["channels"])})
    enc = raw["image_encoder"]
    image_encoder = ImageEncoderConfig(**{**enc, "clip": CLIPVisionConfig(**enc["clip"])})
    return PaintByExampleConfig(unet=unet, vae=vae, image_encoder=image_encoder)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file: the ONE safetensors reader of pbe and weights_convert.

    The tensors are views of one private (copy-on-write) memory map of the file, made by safetensors itself
    (measured with safetensors 0.8: every tensor's data lies in the file's mapping, and writing to one leaves the file
    unchanged). Nothing is read until a tensor is used, and nothing is copied: loading costs no time and no memory
    beyond the pages touched. Raises ``CheckpointError`` naming the file for anything unreadable; a file shorter than
    its header says (a download cut short) is called truncated, with both sizes.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        sizes = _safetensors_sizes(path)
        if sizes is not None and sizes[0] != sizes[1]:
            expected, actual = sizes
            what, why = ("truncated", "a download cut short?") if actual < expected else ("corrupt", "extra bytes?")
            raise CheckpointError(f"{path}: a {what} safetensors file: its header describes {expected:,} bytes, the "
                                  f"file has {actual:,} ({why} fetch it again)") from None
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _safetensors_sizes(path: str | Path) -> tuple[int, int] | None:
    """(size the header describes, actual size) of a safetensors file: 8 bytes of header length, the JSON header,
    then the tensors' data, whose ``data_offsets`` [begin, end) count from the header's end. None if the header
    itself cannot be read."""
    try:
        with open(path, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > actual:
                return None
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return 8 + header_len + max(ends, default=0), actual
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def is_native(path: str | Path) -> bool:
    """Whether ``path`` is a pbe native checkpoint (a safetensors file whose metadata says so)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all: not ours
        return False


def save_native(
    state_dicts: dict[str, dict[str, torch.Tensor]],
    config: PaintByExampleConfig,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the three networks' state dicts (pbe names) to one safetensors file, atomically."""
    path = Path(path)
    tensors = {
        f"{network}.{key}": (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        for network in NETWORK_NAMES
        for key, t in state_dicts[network].items()
    }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_to_json(config)}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_native(path: str | Path) -> tuple[PaintByExampleConfig, dict[str, dict[str, torch.Tensor]]]:
    """Configs and per-network state dicts of a native checkpoint; tensors are memory-mapped views of the file."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pbe native checkpoint")
    try:
        config = config_from_json(metadata["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: a pbe native checkpoint with an unreadable config ({err!r})") from None
    state_dicts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in NETWORK_NAMES}
    for key, tensor in tensors.items():
        network, _, name = key.partition(".")
        if network not in state_dicts:
            raise CheckpointError(f"{path}: unexpected key {key!r} (a native checkpoint holds {', '.join(NETWORK_NAMES)})")
        state_dicts[network][name] = tensor
    return config, state_dicts


# ---- casting what was read, without holding the whole file twice -----------------------------------------------------
# The readers map checkpoint files into memory (torch.load(mmap=True), safetensors): a tensor costs nothing until it
# is read, but every page read stays resident, and counted in the process's memory, for as long as the mapping lives.
# Loading a float32 file in bfloat16 by casting each tensor therefore ends holding the whole float32 file AND the
# bfloat16 copies (measured: 7.9 GB resident for the official 4.4 GB float32 hub folder, whose bfloat16 weights are
# 2.2 GB). ``cast_tensors`` hands each source's pages back to the kernel as soon as its copy exists, so the peak is
# the narrow copies plus the one tensor being cast. Only pages of a file mapping are handed back, and only whole
# pages inside the tensor: the kernel reads them again from the file if anything touches them later (nothing writes
# to a mapped checkpoint, so they hold what the file holds). Linux only; elsewhere casting works as plain ``.to``.

_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process mapped from files (``/proc/self/maps`` lines with a path), sorted."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def _release_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Hand the whole pages of a contiguous CPU ``tensor`` back to the kernel if they lie in a file mapping."""
    if not mappings or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    index = bisect.bisect_right(mappings, (start, float("inf"))) - 1
    if index < 0 or not mappings[index][0] <= start < end <= mappings[index][1]:
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def cast_tensors(tensors: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` moved to ``device`` and cast to ``dtype`` (each ``None``: kept), one at a time, contiguous; a
    memory-mapped source that had to be copied hands its file pages back at once (see above), so converting a whole
    checkpoint to a narrower dtype peaks at the converted tensors plus the largest source tensor."""
    mappings: list[tuple[int, int]] | None = None  # read once, at the first copy (a plain rename copies nothing)
    out = {}
    for key, tensor in tensors.items():
        cast = tensor.to(device=device, dtype=dtype).contiguous()
        if cast.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            if mappings is None:
                mappings = _file_mappings() if sys.platform.startswith("linux") else []
            _release_file_pages(tensor, mappings)
        out[key] = cast
    return out
