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


def read_native(path: str | Path) -> tuple[PaintByExampleConfig, dict[str, dict[str, torch.Tensor]]]:
    """Configs and per-network state dicts of a native checkpoint; tensors are memory-mapped views of the file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a pbe native checkpoint")
        config = config_from_json(metadata["config"])
        state_dicts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in NETWORK_NAMES}
        for key in f.keys():
            network, _, name = key.partition(".")
            state_dicts[network][name] = f.get_tensor(key)
    return config, state_dicts
