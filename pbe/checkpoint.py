"""pbe's native checkpoint: ONE ``.safetensors`` file holding all three networks, configs in its metadata.

Keys are ``unet.*``, ``vae.*`` and ``image_encoder.*`` in pbe's own names. Writing is atomic (a temporary file in the
same folder, then a rename), so a failure never leaves half a file under the final name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import write_atomically
from .model.config import AutoencoderConfig, CLIPVisionConfig, ImageEncoderConfig, PaintByExampleConfig, UNetConfig

FORMAT = "pbe"
FORMAT_VERSION = "1"
NETWORK_NAMES = ("unet", "vae", "image_encoder")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and the problem."""


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


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def _mapped_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file, the tensors being views of ONE private memory map of it.

    Nothing is read until a tensor is used (the OS pages it in), and no copy is made: loading costs no time and no
    memory beyond the pages touched. The map is copy-on-write, so writing to a tensor never changes the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    metadata = header.pop("__metadata__", {}) or {}
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    data_start = 8 + header_len
    tensors = {}
    for key, info in header.items():
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, data_start + begin, (end - begin,))
        tensors[key] = flat.view(dtype).view(info["shape"])
    return metadata, tensors


def read_native(path: str | Path) -> tuple[PaintByExampleConfig, dict[str, dict[str, torch.Tensor]]]:
    """Configs and per-network state dicts of a native checkpoint; tensors are memory-mapped views of the file."""
    path = Path(path)
    try:
        metadata, tensors = _mapped_tensors(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable pbe native checkpoint ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pbe native checkpoint")
    config = config_from_json(metadata["config"])
    state_dicts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in NETWORK_NAMES}
    for key, tensor in tensors.items():
        network, _, name = key.partition(".")
        state_dicts[network][name] = tensor
    return config, state_dicts
