"""Shared test helpers: where the committed reference fixtures live and how to compare against them.

The fixtures are written by ``scripts/make_reference_tensors.py`` from diffusers/transformers only (never from pbe).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUB = FIXTURES / "hub"  # unet4 + vae4 + image_encoder, hub layout (.bin)
HUB_SMALL = FIXTURES / "hub_small"  # unet2 + vae2 + image_encoder1
ORIGINAL_CKPT = FIXTURES / "original" / "model.ckpt"  # unet4 + vae4 + image_encoder, original layout


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, computed in float32."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "reference.safetensors")


def ldm_base_config():
    """What an original-layout checkpoint cannot reveal about the tiny stand-in (head counts, GroupNorm groups).

    Read from the hub stand-in's config.json files, which describe the same tiny networks.
    """
    import pbe
    from pbe.model import PaintByExampleConfig

    hub = pbe.loading.convert(HUB).config  # configs only; cheap for the tiny stand-in
    base = PaintByExampleConfig()
    return dataclasses.replace(
        base,
        unet=dataclasses.replace(base.unet, heads=hub.unet.heads, norm_groups=hub.unet.norm_groups),
        vae=dataclasses.replace(base.vae, norm_groups=hub.vae.norm_groups),
        image_encoder=dataclasses.replace(
            base.image_encoder, clip=dataclasses.replace(base.image_encoder.clip, heads=hub.image_encoder.clip.heads)
        ),
    )


@pytest.fixture(scope="session")
def original_safetensors(tmp_path_factory) -> Path:
    """The original-layout stand-in re-saved as .safetensors (a plain container change: same keys, same tensors)."""
    from safetensors.torch import save_file

    from weights_convert.readers import read_tensors

    path = tmp_path_factory.mktemp("original") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in read_tensors(ORIGINAL_CKPT).items()}, path)
    return path
