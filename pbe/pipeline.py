"""Paint by Example end to end: preprocess -> encode -> denoise -> decode.

Same semantics, same random draws in the same order, as diffusers' ``PaintByExamplePipeline`` (the parity reference):
1. initial noise ``randn(B * n, 4, h, w)`` times the scheduler's ``init_noise_sigma``,
2. the masked image's latent: a SAMPLE of the autoencoder's posterior, times the scaling factor,
3. (DDIM with eta > 0 only) one noise draw per step.
Classifier-free guidance runs the batch as [unconditional, conditional] and mixes eps_u + s (eps_c - eps_u).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import images as imageio
from .loading import PaintByExampleNetworks, load, resolve_checkpoint
from .memory import reuse_freed_memory
from .model import AutoencoderKL, ImageEncoder, UNet
from .model.noise import randn
from .schedulers import Scheduler, make_scheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PaintByExampleOutput:
    """``images``: a list of PIL images, an array [N, H, W, 3] in [0, 1], a tensor [N, 3, H, W] in [0, 1], or latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class PaintByExample:
    """Exemplar-guided inpainting: ``pipe(example_image, image, mask_image).images``.

    White in ``mask_image`` is repainted with the content of ``example_image``; black is kept.
    """

    def __init__(
        self,
        unet: UNet,
        vae: AutoencoderKL,
        image_encoder: ImageEncoder,
        scheduler: Scheduler | str = "pndm",
        *,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.scheduler = make_scheduler(scheduler, self.scheduler_config) if isinstance(scheduler, str) else scheduler

    @classmethod
    def from_pretrained(
        cls,
        src: str | Path = "Fantasy-Studio/Paint-by-Example",
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        scheduler: str = "pndm",
    ) -> "PaintByExample":
        """Load from anything ``pbe.load`` takes, or a hub repo id (fetched into the Hugging Face cache on first use)."""
        path = resolve_checkpoint(src)
        networks: PaintByExampleNetworks = load(path, dtype=dtype, device=device)
        scheduler_json = path / "scheduler" / "scheduler_config.json" if path.is_dir() else None
        config = json.loads(scheduler_json.read_text()) if scheduler_json and scheduler_json.is_file() else None
        return cls(networks.unet, networks.vae, networks.image_encoder, scheduler, scheduler_config=config)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def encode_example(self, example_image: Any) -> torch.Tensor:
        """The conditioning token(s) [Bx, 1, D] of one or several example images."""
        size = self.image_encoder.config.clip.image_size
        pixels = imageio.preprocess_example(example_image, size=size)
        return self.image_encoder(pixels.to(self.device, self.image_encoder.proj.weight.dtype))

    def _context(self, example_image: Any, batch: int, n: int, guided: bool) -> torch.Tensor:
        cond = self.encode_example(example_image)
        if cond.shape[0] not in (1, batch):
            raise ValueError(f"example_image: got {cond.shape[0]} example images for {batch} images; "
                             f"give one example for all of them or one per image")
        # Latents are ordered [image 0..B-1] repeated n times (diffusers' `repeat`); the contexts follow the same order,
        # so image i is always painted with example i. (diffusers interleaves its contexts instead, which pairs images
        # with the wrong examples when B > 1 and n > 1; with one example, or B = 1, both orders are the same.)
        cond = cond.expand(batch, -1, -1).repeat(n, 1, 1)
        if not guided:
            return cond
        uncond = self.image_encoder.uncond_embedding.to(cond.dtype).expand(cond.shape[0], -1, -1)
        return torch.cat([uncond, cond])

    @torch.no_grad()
    def __call__(
        self,
        example_image: Any,
        image: Any,
        mask_image: Any,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        scheduler: Scheduler | str | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        progress: bool = True,
        keep_unmasked: bool = False,
        mask_blur: float = 0.0,
        **unsupported: Any,
    ) -> PaintByExampleOutput:
        """Paint the white part of ``mask_image`` in ``image`` with the content of ``example_image``.

        Inputs are PIL images (or lists of them), numpy arrays or tensors, with diffusers' meaning: a tensor image is
        in [-1, 1], a tensor mask in [0, 1] with 1 = repaint, a tensor example is already CLIP-normalised. One example
        may serve a whole batch. ``keep_unmasked`` pastes the input back outside the mask (softened by ``mask_blur``
        pixels); sides that are not multiples of 8 are padded and cropped back.
        """
        if "negative_prompt" in unsupported:
            raise TypeError("negative_prompt: Paint by Example has no text prompt; the unconditional side of guidance is "
                            "the learned embedding image_encoder.uncond_embedding")
        if unsupported:
            raise TypeError(f"PaintByExample.__call__() got unexpected keyword arguments: {', '.join(sorted(unsupported))}")
        self._check_arguments(num_inference_steps, guidance_scale, num_images_per_prompt, output_type, callback_steps,
                              keep_unmasked, mask_blur)
        sched = make_scheduler(scheduler, self.scheduler_config) if isinstance(scheduler, str) else (scheduler or self.scheduler)
        device, dtype, n = self.device, self.dtype, num_images_per_prompt
        guided = guidance_scale > 1.0

        keep_mask, pixels = imageio.prepare_image_and_mask(image, mask_image)
        factor = self.vae.config.downscale
        original_size = tuple(pixels.shape[-2:])
        pixels, keep_mask = imageio.pad_to_multiple(pixels, keep_mask, multiple=8)
        batch, (height, width) = pixels.shape[0], pixels.shape[-2:]
        masked_pixels = pixels * keep_mask

        context = self._context(example_image, batch, n, guided)
        run = sched.start(num_inference_steps)  # this call's timesteps and sampler state
        timesteps = run.timesteps

        # Random draw 1: the initial noise.
        shape = (batch * n, self.vae.config.latent_channels, height // factor, width // factor)
        if latents is None:
            latents = randn(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {list(shape)}, got {list(latents.shape)}")
        latents = latents.to(device, dtype) * run.init_noise_sigma

        # Random draw 2: the masked image's latent is a sample of the posterior, not its mean.
        # Reference quirk: the latent-size keep mask is a plain nearest resize of the pixel mask.
        latent_mask = F.interpolate(keep_mask, size=shape[-2:]).to(device, dtype)
        masked_latents = self.vae.encode(masked_pixels.to(device, dtype)).sample(generator) * self.vae.config.scaling_factor
        latent_mask, masked_latents = latent_mask.repeat(n, 1, 1, 1), masked_latents.repeat(n, 1, 1, 1)

        # Denoise. The UNet sees [noisy latent, masked-image latent, keep mask] stacked along channels.
        order = getattr(sched, "order", 1)  # diffusers' meaning: model evaluations per reported step
        warmup = len(timesteps) - num_inference_steps * order
        # Every step allocates the same tensors again: keep freed memory for the next step instead of taking fresh
        # pages from the kernel (see pbe.memory; the autoencoder runs outside, its few large tensors would fragment it).
        with reuse_freed_memory():
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", unit="step")):
                # With guidance the context holds [unconditional, conditional] rows for the same sample: the UNet
                # fans the sample out itself, after the layers the context cannot influence.
                model_input = torch.cat([run.scale_model_input(latents, t), masked_latents, latent_mask], dim=1)
                eps = self.unet(model_input, t, context)
                if guided:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = run.step(eps, t, latents, eta=eta, generator=generator)
                reported = i == len(timesteps) - 1 or (i + 1 > warmup and (i + 1) % order == 0)
                if callback is not None and reported and i % callback_steps == 0:
                    callback(i // order, int(t), latents)

        if output_type == "latent":
            return PaintByExampleOutput(latents)
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor)
        result = (decoded / 2 + 0.5).clamp(0, 1)
        if keep_unmasked:
            original = (pixels.to(result.device, result.dtype) / 2 + 0.5).repeat(n, 1, 1, 1)
            result = imageio.paste_back(result, original, keep_mask.to(result.device).repeat(n, 1, 1, 1), blur_radius=mask_blur)
        result = imageio.crop(result, original_size)
        if output_type == "pt":
            return PaintByExampleOutput(result)
        array = imageio.to_numpy(result)
        return PaintByExampleOutput(array if output_type == "np" else imageio.to_pil(result))

    @staticmethod
    def _check_arguments(steps: int, guidance: float, n: int, output_type: str, callback_steps: int,
                         keep_unmasked: bool, mask_blur: float) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive integer, got {steps!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive integer, got {n!r}")
        if not np.isfinite(guidance):
            raise ValueError(f"guidance_scale: expected a finite number, got {guidance!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(callback_steps, int) or callback_steps < 1:
            raise ValueError(f"callback_steps: expected a positive integer, got {callback_steps!r}")
        if keep_unmasked and output_type == "latent":
            raise ValueError("keep_unmasked: pasting pixels back needs decoded images, not output_type='latent'")
        if mask_blur < 0:
            raise ValueError(f"mask_blur: expected a radius >= 0, got {mask_blur!r}")
