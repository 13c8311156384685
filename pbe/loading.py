"""Load the three networks from anything Paint by Example ships in, or from pbe's native file.

``pbe.load(src)`` accepts:
1. a folder in the hub layout of ``Fantasy-Studio/Paint-by-Example`` (``.bin`` or ``.safetensors`` weights),
2. the original release ``model.ckpt`` (or an original-layout ``.safetensors``),
3. a pbe native ``.safetensors`` (see ``pbe.checkpoint``).
Networks are built on the meta device and receive the checkpoint's tensors directly (cast once to ``dtype``), so no
randomly initialised copy is ever made. Loading is strict: every parameter is filled exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weights_convert.convert import convert

from .checkpoint import NETWORK_NAMES, CheckpointError, is_native, read_native
from .model import AutoencoderKL, ImageEncoder, PaintByExampleConfig, UNet

NETWORK_CLASSES = {"unet": UNet, "vae": AutoencoderKL, "image_encoder": ImageEncoder}


@dataclass
class PaintByExampleNetworks:
    """The three networks of Paint by Example and the configs they were built from."""

    unet: UNet
    vae: AutoencoderKL
    image_encoder: ImageEncoder
    config: PaintByExampleConfig

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: getattr(self, name).state_dict() for name in NETWORK_NAMES}


def build_network(name: str, config: PaintByExampleConfig, state_dict: dict[str, torch.Tensor], *,
                  dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """One network, built on the meta device and filled strictly with ``state_dict`` cast to ``dtype``."""
    with torch.device("meta"):
        model = NETWORK_CLASSES[name](getattr(config, name))
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load(
    src: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: PaintByExampleConfig | None = None,
) -> PaintByExampleNetworks:
    """The UNet, autoencoder and image encoder from a hub folder, an original checkpoint or a native file.

    ``config`` matters only for original-layout checkpoints, whose head counts and GroupNorm groups cannot be read
    from the weights: the structure is read from the tensors' shapes, the rest taken from ``config`` (default: the
    official values). Raises ``pbe.CheckpointError`` (a ``ValueError``) naming the file and the problem.
    """
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() and is_native(path):
        config, state_dicts = read_native(path)
    else:
        converted = convert(path, base=config)
        config, state_dicts = converted.config, converted.state_dicts
    networks = {name: build_network(name, config, state_dicts[name], dtype=dtype, device=device) for name in NETWORK_NAMES}
    return PaintByExampleNetworks(**networks, config=config)
