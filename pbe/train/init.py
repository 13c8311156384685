"""The paper's initialisation: Paint by Example's networks from Stable Diffusion 1.x and CLIP ViT-L/14.

Yang et al., "Paint by Example" (arXiv 2211.13227), section 4.1, and the official code (scripts/modify_checkpoints.py,
ldm/models/diffusion/ddpm.py): the UNet and autoencoder are Stable Diffusion's; the UNet's first convolution gains
zero weights for the 5 new input channels (masked-image latent 4, keep mask 1, after the noisy latent 4), so at step 0
it computes exactly SD's function of the noisy latent; the image encoder's CLIP tower is CLIP ViT-L/14's; the mapper,
the final LayerNorm and the projection start fresh, the unconditional token as N(0, 1) noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from weights_convert.convert import read_config
from weights_convert.init_sources import convert_clip_vision, convert_stable_diffusion

from ..checkpoint import meta_network
from ..errors import CheckpointError
from ..loading import PaintByExampleNetworks, build_network
from ..model import PaintByExampleConfig


def networks_from_stable_diffusion(
    sd_checkpoint: str | Path,
    clip_checkpoint: str | Path,
    *,
    config: PaintByExampleConfig | str | Path | None = None,
    seed: int = 23,
    dtype: torch.dtype = torch.float32,
) -> PaintByExampleNetworks:
    """Paint by Example's three networks initialised as the paper does, on the CPU, ready to train.

    ``sd_checkpoint``: Stable Diffusion 1.x, the original single file (``v1-5-pruned.ckpt`` / ``.safetensors``; its
    text encoder, EMA copy and DDPM buffers are skipped on purpose: training starts from the non-EMA weights) or a
    diffusers folder with ``unet/`` and ``vae/`` (other folders are not read). ``clip_checkpoint``: a transformers
    ``CLIPVisionModel`` or ``CLIPModel`` checkpoint (``openai/clip-vit-large-patch14``), a weights file or a folder
    with its config.json; only the vision tower is taken. ``config``: the structure to build (a
    ``PaintByExampleConfig``, a pbe config JSON or a hub-layout folder; default the official one); both checkpoints
    must fit it, the SD UNet with 4 input channels where the config's takes 9.

    The UNet's ``conv_in`` takes SD's weights for channels 0..3 and zeros for 4..8. The mapper, final LayerNorm and
    projection are initialised as ``nn.Linear``/``nn.LayerNorm`` initialise themselves (what the official code and
    diffusers use: weights and biases uniform in +-1/sqrt(fan_in), LayerNorm weight 1 and bias 0), and the
    unconditional token is ``torch.randn(1, 1, D, generator=torch.Generator().manual_seed(seed))``; the same
    generator then draws the Linear weights in module order, so the result depends on ``seed`` only. Networks come
    back in ``dtype``, in eval mode with gradients off, as ``pbe.load`` returns them: the training loop chooses what
    trains. Raises ``pbe.CheckpointError`` naming the argument, the path and the problem (a Paint by Example or
    inpainting checkpoint given as SD, a file without a UNet, a CLIP tower of another size than the config's).
    """
    if config is None:
        config = PaintByExampleConfig()
    elif not isinstance(config, PaintByExampleConfig):
        config = read_config(config, name="config=")
    latent = config.vae.latent_channels
    if config.unet.in_channels != 2 * latent + 1:
        raise CheckpointError(f"config=: the UNet takes {config.unet.in_channels} input channels; Paint by Example's "
                              f"takes {2 * latent + 1} (noisy latent + masked-image latent + mask)")
    for name, src in [("sd_checkpoint", sd_checkpoint), ("clip_checkpoint", clip_checkpoint)]:
        if not Path(src).expanduser().exists():  # both, before either is read
            raise CheckpointError(f"{name} {Path(src).expanduser()}: no such file or folder")
    clip = convert_clip_vision(clip_checkpoint, config=config)
    sd = convert_stable_diffusion(sd_checkpoint, config=config)

    unet_state = dict(sd.state_dicts["unet"])
    unet_state["conv_in.weight"] = widen_input_channels(unet_state["conv_in.weight"], config.unet.in_channels)
    encoder_state = {**clip.state_dicts["image_encoder"], **fresh_image_encoder_head(config, seed=seed)}
    states = {"unet": unet_state, "vae": sd.state_dicts["vae"], "image_encoder": encoder_state}
    origins = {"unet": sd.sources["unet"], "vae": sd.sources["vae"], "image_encoder": clip.sources["image_encoder"]}
    networks = {name: build_network(name, config, state, dtype=dtype, device="cpu", origin=origins[name])
                for name, state in states.items()}
    return PaintByExampleNetworks(**networks, config=config)


def widen_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``weight`` [C, c, k, k] followed by zeros for input channels c..in_channels-1: new inputs contribute nothing."""
    out, have, *kernel = weight.shape
    if have > in_channels:
        raise ValueError(f"conv_in has {have} input channels, more than the {in_channels} to widen to")
    return torch.cat([weight, weight.new_zeros(out, in_channels - have, *kernel)], dim=1)


def fresh_image_encoder_head(config: PaintByExampleConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """The image encoder's trained parts beyond CLIP: mapper, final norm, projection, unconditional token (float32).

    The token first: ``randn`` from a generator seeded with ``seed``; then, in module order, every Linear's weight and
    bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``nn.Linear``'s own init: kaiming-uniform with a = sqrt(5)), every
    LayerNorm 1 and 0.
    """
    generator = torch.Generator().manual_seed(seed)
    encoder = meta_network("image_encoder", config)
    state = {"uncond_embedding": torch.randn(encoder.uncond_embedding.shape, generator=generator)}
    for name, module in encoder.named_modules():
        if name == "clip" or name.startswith("clip."):
            continue
        if isinstance(module, nn.Linear):
            bound = 1 / math.sqrt(module.in_features)
            for key, param in module.named_parameters():
                state[f"{name}.{key}"] = (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
        elif isinstance(module, nn.LayerNorm):
            state[f"{name}.weight"] = torch.ones(module.normalized_shape)
            state[f"{name}.bias"] = torch.zeros(module.normalized_shape)
    return state
