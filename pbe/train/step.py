"""One training step of Paint by Example: the noise-prediction loss of a batch.

Yang et al., "Paint by Example" (arXiv 2211.13227), section 3 and the official ldm/models/diffusion/ddpm.py
(LatentDiffusion.get_input, forward, p_losses):

    z_0      = E(image) * 0.18215                     a SAMPLE of the frozen autoencoder's posterior
    z_masked = E(image * keep_mask) * 0.18215         likewise (the masked scene)
    m        = bilinear resize of keep_mask to the latent size
    c        = proj(final_norm(mapper(CLIP(reference))))   or, with probability 0.2 per BATCH, the learned uncond token
    x_t      = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,   t ~ U{0..999}, eps ~ N(0, I)
    loss     = mean (eps - unet([x_t, z_masked, m], t, c))^2

Every random number is drawn by ``draw`` into a ``Draws``; ``loss`` is deterministic given them, so a reference can
be fed the very same draws (tests/test_train_step.py), and several processes or micro-batches can each take their
rows of one batch's draws (``Draws.rows``) and together compute exactly the step of one large batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..model import AutoencoderKL, ImageEncoder, UNet
from ..model.noise import randn
from ..schedulers import OFFICIAL_CONFIG
from ..schedulers.base import alphas_cumprod as schedule_alphas_cumprod


class Networks(Protocol):
    """What a training step needs: the three networks (``pbe.PaintByExampleNetworks`` or ``TrainingModel``)."""

    unet: UNet
    vae: AutoencoderKL
    image_encoder: ImageEncoder


@dataclass(frozen=True)
class Draws:
    """Every random number of one training step, for a batch of B samples."""

    drop: bool  # condition the whole batch on the learned uncond token (classifier-free dropout, once per batch)
    timesteps: torch.Tensor  # [B] int64, uniform in [0, num_train_timesteps)
    image_noise: torch.Tensor  # [B, 4, h, w]: the posterior sample of the scene's latent is mean + std * this
    masked_noise: torch.Tensor  # [B, 4, h, w]: likewise for the masked scene's latent
    noise: torch.Tensor  # [B, 4, h, w]: eps, the noise added to z_0 and the UNet's target

    def rows(self, start: int, stop: int) -> Draws:
        """The draws of samples ``start..stop-1`` (a micro-batch, or one process's share); ``drop`` is shared."""
        return Draws(self.drop, *(getattr(self, f.name)[start:stop] for f in fields(self)[1:]))

    def to(self, device: torch.device | str) -> Draws:
        """The same draws on ``device`` (they are made on the generator's, the CPU's in training)."""
        return Draws(self.drop, *(getattr(self, f.name).to(device) for f in fields(self)[1:]))


def draw(
    batch_size: int,
    generator: torch.Generator,
    *,
    latent_shape: tuple[int, int, int],
    uncond_prob: float,
    num_train_timesteps: int = 1000,
) -> Draws:
    """All random numbers of one step, from ``generator`` in a fixed order (drop, timesteps, the two posterior
    noises, eps), on the generator's device in float32.

    ``latent_shape``: (channels, h, w) of the latents (4, resolution / 8, resolution / 8).
    """
    drop = bool(torch.rand((), generator=generator, device=generator.device) < uncond_prob)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
    shape = (batch_size, *latent_shape)
    image_noise, masked_noise, noise = (randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
                                        for _ in range(3))
    return Draws(drop, timesteps, image_noise, masked_noise, noise)


def official_alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t of the official schedule (scaled_linear betas 0.00085..0.012, 1000 steps), float32."""
    return schedule_alphas_cumprod(OFFICIAL_CONFIG)


def loss(
    networks: Networks,
    batch: dict[str, torch.Tensor],
    draws: Draws,
    *,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean squared error of the UNet's noise prediction for ``batch`` with ``draws`` (a 0-d float32 tensor).

    ``batch``: ``image`` [B, 3, R, R] in [-1, 1], ``keep_mask`` [B, 1, R, R] (1 = keep, 0 = repaint), ``reference``
    [B, 3, S, S] CLIP-normalised, on the networks' device. The autoencoder and the CLIP tower run without gradients;
    the mapper, final norm, projection, uncond token and UNet record them (as far as they require grad).
    ``alphas_cumprod``: the noise schedule (default: the official one).
    """
    unet, vae, encoder = networks.unet, networks.vae, networks.image_encoder
    image, keep_mask, reference = batch["image"], batch["keep_mask"], batch["reference"]
    draws = draws.to(image.device)
    scale = vae.config.scaling_factor

    # The frozen parts: latents of the scene and of the masked scene, CLIP's class token of the reference.
    with torch.no_grad():
        z0 = _sample(vae, image, draws.image_noise) * scale
        z_masked = _sample(vae, image * keep_mask, draws.masked_noise) * scale
        pooled = encoder.clip(reference)
    # Reference quirk: training resizes the keep mask bilinearly (torchvision 0.12's Resize on a tensor: no
    # antialiasing), giving soft values on the edges, while inference resizes it nearest (as diffusers does).
    latent_mask = F.interpolate(keep_mask, size=z0.shape[-2:], mode="bilinear", align_corners=False)

    # Classifier-free dropout: the whole batch gets the uncond token. torch.where keeps both branches in the graph
    # (the one not taken gets zero gradients, as in the original, which also encodes the reference when dropping), so
    # every trained parameter takes part in every step, as DDP expects.
    context = encoder.head(pooled)
    uncond = encoder.uncond_embedding.to(context.dtype).expand_as(context)
    context = torch.where(torch.tensor(draws.drop, device=context.device), uncond, context)

    # Forward diffusion q(x_t | z_0), then the noise prediction.
    if alphas_cumprod is None:
        alphas_cumprod = official_alphas_cumprod()
    alpha_bar = alphas_cumprod.to(z0.device)[draws.timesteps].reshape(-1, 1, 1, 1)
    noise = draws.noise.to(z0.dtype)
    x_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    sample = torch.cat([x_t, z_masked, latent_mask.to(z0.dtype)], dim=1)  # (B, 4 + 4 + 1, h, w)
    eps = unet(sample, draws.timesteps, context)
    return F.mse_loss(eps.float(), noise.float())


def _sample(vae: AutoencoderKL, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A sample of the posterior over ``x``'s latent, mean + std * noise (the original's get_first_stage_encoding)."""
    posterior = vae.encode(x)
    return posterior.mean + posterior.std * noise.to(posterior.mean.dtype)


# ---- what trains ---------------------------------------------------------------------------------------------------

# With ONE context token, the cross-attentions' queries, keys and input norm cannot change the output (softmax over
# one key is exactly 1: pbe.model.unet.CrossAttention.one_token), so their gradient is zero in the original too.
# They are left out of the trained set; plain AdamW would otherwise only shrink them by its weight decay.
NO_GRADIENT = (".cross_attn.to_q.", ".cross_attn.to_k.", ".cross_attn_norm.")


def trained_parameters(networks: Networks) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters the paper trains, by name (``unet.*``, ``image_encoder.*``): the whole UNet (cross-attention
    queries/keys excepted, see NO_GRADIENT), the mapper, the final norm, the projection and the uncond token. The
    autoencoder and the CLIP tower stay frozen."""
    for name, parameter in networks.unet.named_parameters():
        if not any(part in f".{name}" for part in NO_GRADIENT):
            yield f"unet.{name}", parameter
    for name, parameter in networks.image_encoder.named_parameters():
        if not name.startswith("clip."):
            yield f"image_encoder.{name}", parameter


def freeze_for_training(networks: Networks, trained: list[nn.Parameter]) -> None:
    """``requires_grad`` on exactly the ``trained`` parameters; train mode on the UNet and the image encoder (the
    networks have no dropout or batch statistics, so the mode changes nothing but what users expect to see)."""
    ids = {id(p) for p in trained}
    for network in (networks.unet, networks.vae, networks.image_encoder):
        for parameter in network.parameters():
            parameter.requires_grad_(id(parameter) in ids)
    networks.unet.train()
    networks.image_encoder.train()
    networks.vae.eval()


class TrainingModel(nn.Module):
    """The three networks as one module whose ``forward(batch, draws)`` is the loss: what DDP and FSDP wrap."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, image_encoder: ImageEncoder,
                 alphas_cumprod: torch.Tensor | None = None) -> None:
        super().__init__()
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.alphas_cumprod = official_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod

    def forward(self, batch: dict[str, torch.Tensor], draws: Draws) -> torch.Tensor:
        return loss(self, batch, draws, alphas_cumprod=self.alphas_cumprod)
