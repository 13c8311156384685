"""Paint by Example end to end, in five stages: checks -> inputs -> example encoding -> denoising -> decoding/output.

Same semantics, same random draws in the same order, as diffusers' ``PaintByExamplePipeline`` (the parity reference):
1. initial noise ``randn(B * n, 4, h, w)`` times the scheduler's ``init_noise_sigma``,
2. the masked image's latent: a SAMPLE of the autoencoder's posterior, times the scaling factor,
3. (DDIM with eta > 0 only) one noise draw per step.
Classifier-free guidance runs the batch as [unconditional, conditional] and mixes eps_u + s (eps_c - eps_u).

Large pictures (``hd_strategy``, see pbe.regions): a picture whose longer side is at most ``hd_trigger`` pixels, or
any picture with ``hd_strategy="original"``, runs exactly as above. Otherwise the picture is cut into work items (one
per mask region with "crop", the whole picture scaled with "resize"), the example is encoded once, and each item is
painted in turn, in plan order, with its own draws 1-3 in the order above, then pasted back through the mask.

Each network is fed in its own parameters' dtype and device (an fp16 UNet may sit beside an fp32 autoencoder): the
stages convert their results on the way to the next network.
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
from torch import nn
from tqdm.auto import tqdm

from . import devices, lora_files, regions
from . import images as imageio
from .loading import DEFAULT_REPO, PaintByExampleNetworks, load, resolve_checkpoint
from .memory import reuse_freed_memory
from .model import AutoencoderKL, ImageEncoder, PaintByExampleConfig, UNet
from .model.lora import lora_layers, merge_lora, remove_lora, set_lora_scale
from .model.noise import Generators, randn
from .options import PaintOptions
from .schedulers import SCHEDULERS, Run, Scheduler, make_scheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The painting keywords of __call__ and their defaults: those of PaintOptions (the signature shows the same values,
# as diffusers' does; tests/test_options.py holds them equal).
_KEYWORD_DEFAULTS = PaintOptions().pipeline_keywords()
Device = str | torch.device
Callback = Callable[[int, int, torch.Tensor], None]

# diffusers' keyword arguments that Paint by Example cannot honour, and why (a TypeError says so).
REFUSED_ARGUMENTS = {
    "negative_prompt": "Paint by Example has no text prompt; the unconditional side of guidance is the learned "
                       "embedding image_encoder.uncond_embedding",
    "height": "the output has the size of `image` (diffusers ignores it too); resize image and mask_image instead",
    "width": "the output has the size of `image` (diffusers ignores it too); resize image and mask_image instead",
    "return_dict": "pbe always returns a PaintByExampleOutput; take its .images",
}


@dataclass
class PaintByExampleOutput:
    """``images``: a list of PIL images, an array [N, H, W, 3] in [0, 1], a tensor [N, 3, H, W] in [0, 1], or latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class PreparedInputs:
    """The picture to paint, as the inputs stage hands it to the others (float32, on the CPU)."""

    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1], padded at the bottom/right to multiples of 8
    keep_mask: torch.Tensor  # (B, 1, H, W), 1 = keep, 0 = repaint; the padding is kept
    original_size: tuple[int, int]  # (H, W) before padding: the output is cropped back to it

    @property
    def batch(self) -> int:
        return self.pixels.shape[0]


def _placement(network: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a network computes in: those of its parameters."""
    parameter = next(network.parameters())
    return parameter.device, parameter.dtype


def _resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``torch_dtype`` (diffusers' name) and ``dtype`` are synonyms: give one, or both equal."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise TypeError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; they are synonyms, give one of them")
    chosen = torch_dtype if torch_dtype is not None else dtype
    if chosen is not None and (not isinstance(chosen, torch.dtype) or not chosen.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype such as torch.float16, got {chosen!r}")
    return chosen


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
        src: str | Path = DEFAULT_REPO,
        *,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        device: Device = "cpu",
        scheduler: str = "pndm",
        config: PaintByExampleConfig | str | Path | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> PaintByExample:
        """Load from anything ``pbe.load`` takes, or a hub repo id (fetched into the Hugging Face cache on first use).

        ``torch_dtype`` (diffusers' name) or its synonym ``dtype``: the dtype of all three networks, default float32;
        giving both with different values is a TypeError. ``device``: where the networks are placed (``"auto"``: see
        ``pbe.devices.resolve_device``). A half precision the CPU has no instructions for warns once
        (``pbe.devices.SlowPrecisionWarning``): it runs, emulated, far slower than float32. ``config``: the networks'
        config for an original-layout checkpoint of a non-official structure (see ``pbe.load``). ``lora``: a LoRA file
        to apply at strength ``lora_scale`` (see ``load_lora_weights``), checked before the checkpoint loads.
        """
        chosen = _resolve_dtype(dtype, torch_dtype) or torch.float32
        device = devices.resolve_device(device)
        devices.check_precision(device, chosen, refuse=False)
        if lora is not None:
            lora_files.check_lora_file(lora, scale=lora_scale)
        path = resolve_checkpoint(src)
        networks: PaintByExampleNetworks = load(path, dtype=chosen, device=device, config=config)
        scheduler_json = path / "scheduler" / "scheduler_config.json" if path.is_dir() else None
        config = json.loads(scheduler_json.read_text()) if scheduler_json and scheduler_json.is_file() else None
        pipe = cls(networks.unet, networks.vae, networks.image_encoder, scheduler, scheduler_config=config)
        if lora is not None:
            pipe.load_lora_weights(lora, scale=lora_scale)
        return pipe

    # ---- LoRA --------------------------------------------------------------------------------------------------------

    def load_lora_weights(self, path: str | Path, *, scale: float = 1.0, weight_name: str | None = None) -> None:
        """Adapt the UNet with a LoRA file at strength ``scale`` (1 = as trained, 0 = the base model).

        ``path``: a pbe LoRA file (``pbe.lora_files.save_lora``, ``pbe train`` with LoRA) or a diffusers/peft UNet
        LoRA file (``save_lora_weights``), or a folder holding one (``weight_name``, default diffusers'
        ``pytorch_lora_weights.safetensors``). One adapter at a time: loading another replaces it. Raises
        ``pbe.CheckpointError`` naming the file for a missing or non-LoRA file or weights that do not fit this UNet
        (the UNet is then left as it was).
        """
        lora_files.load_lora(self.unet, lora_files.lora_file(path, weight_name=weight_name), scale=scale)

    def set_lora_scale(self, scale: float) -> None:
        """The strength of the loaded LoRA (1 = as trained, 0 = the base model); ValueError if none is loaded."""
        set_lora_scale(self.unet, scale)

    def fuse_lora(self, *, lora_scale: float | None = None) -> None:
        """Fold the loaded LoRA into the UNet's weights at its current strength (or ``lora_scale``): the UNet runs
        as fast as the base one afterwards. Not reversible here: load the checkpoint again to undo it."""
        if lora_scale is not None:
            set_lora_scale(self.unet, lora_scale)
        elif not lora_layers(self.unet):
            raise ValueError("fuse_lora: no LoRA is loaded")
        merge_lora(self.unet)

    def unload_lora_weights(self) -> None:
        """Drop the loaded (unfused) LoRA: the UNet is the base model again."""
        remove_lora(self.unet)

    # ---- where the networks live -------------------------------------------------------------------------------------

    @property
    def networks(self) -> tuple[UNet, AutoencoderKL, ImageEncoder]:
        return self.unet, self.vae, self.image_encoder

    @property
    def device(self) -> torch.device:
        """The UNet's device: where the denoising loop runs and the latents live."""
        return _placement(self.unet)[0]

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype: the one the denoising loop runs in (the other networks may differ, see ``to``)."""
        return _placement(self.unet)[1]

    def to(
        self,
        *args: Device | torch.dtype | None,
        device: Device | None = None,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> PaintByExample:
        """Move and/or cast all three networks, in place; returns the pipeline, as diffusers' ``to`` does.

        Call shapes: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(device=..., dtype=...)``
        (``torch_dtype=`` is a synonym of ``dtype=``). To give one network its own dtype, cast it alone:
        ``pipe.unet.half()``; the pipeline feeds every network in its own dtype. Warns as ``from_pretrained`` does
        about a half precision the CPU has no instructions for.
        """
        if len(args) > 2:
            raise TypeError(f"to() takes at most 2 positional arguments (device, dtype), got {len(args)}")
        if len(args) == 1 and isinstance(args[0], torch.dtype):
            args = (None, args[0])
        positional_device, positional_dtype = (*args, None, None)[:2]
        if isinstance(positional_device, torch.dtype):
            raise TypeError(f"to(device, dtype): the first argument is the device, got {positional_device}")
        if positional_device is not None and device is not None:
            raise TypeError(f"to(): device given twice, {positional_device!r} and device={device!r}")
        if positional_dtype is not None and (dtype is not None or torch_dtype is not None):
            raise TypeError(f"to(): dtype given twice, {positional_dtype} and as a keyword")
        target_dtype = _resolve_dtype(positional_dtype if positional_dtype is not None else dtype, torch_dtype)
        target_device = positional_device if positional_device is not None else device
        target_device = None if target_device is None else devices.resolve_device(target_device)
        for network in self.networks:
            network.to(device=target_device, dtype=target_dtype)
            devices.check_precision(*_placement(network), refuse=False)
        return self

    # ---- the stages --------------------------------------------------------------------------------------------------

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
        generator: Generators = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        scheduler: Scheduler | str | None = None,
        callback: Callback | None = None,
        callback_steps: int = 1,
        progress: bool = True,
        keep_unmasked: bool = False,
        mask_blur: float = 0.0,
        hd_strategy: str = "crop",
        resolution: int = 512,
        hd_trigger: int = 800,
        hd_margin: int = 128,
        options: PaintOptions | None = None,
        **unsupported: Any,
    ) -> PaintByExampleOutput:
        """Paint the white part of ``mask_image`` in ``image`` with the content of ``example_image``.

        Inputs are PIL images (or lists of them), numpy arrays or tensors, with diffusers' meaning: a tensor image is
        in [-1, 1], a tensor mask in [0, 1] with 1 = repaint, a tensor example is already CLIP-normalised. One example
        may serve a whole batch. ``keep_unmasked`` pastes the input back outside the mask (softened by ``mask_blur``
        pixels: refused without it, as ``pbe paint`` refuses it). ``eta``: DDIM's noise, ignored by the other samplers.

        The painting options (steps, guidance, eta, scheduler by name, paste-back, large pictures) are
        ``pbe.options.PaintOptions``, checked there (an ``OptionError``, a ValueError, names the keyword): pass them as
        diffusers' keywords, or all at once as ``options`` (then give none of those keywords; the sampler is built by
        name from this pipeline's scheduler config). ``scheduler`` may also be a Scheduler object (None: the
        pipeline's own); either way the step count and DDIM's largest ``eta`` are checked against the sampler that runs
        (``PaintOptions.check_run``).
        Sides that are not multiples of 8 are padded and cropped back. ``generator`` may be one generator or, as in
        diffusers, a list of one per image painted (images x ``num_images_per_prompt``): image i's noise then
        comes from generator i (the masked image's latent sample of image i < len(image) too, as diffusers draws it).

        Large pictures: when the longer side exceeds ``hd_trigger`` pixels, ``hd_strategy="crop"`` paints one box per
        mask region (grown by ``hd_margin`` pixels of context) scaled so its longer side is ``resolution``;
        ``"resize"`` paints the whole picture scaled to ``resolution``; ``"original"`` paints it at its own size.
        With crop and resize the painted pixels are always pasted back through the mask (feathered by ``mask_blur``),
        the output has the input's size and every pixel farther from the mask than the feather radius is the
        input's; the random draws are made per item, in plan order; ``callback`` is called for each item's loop;
        ``latents`` and ``output_type="latent"`` are refused (there is no single latent of the whole picture).
        Below the trigger nothing changes: the picture is painted whole, as diffusers does.

        Raises:
            ValueError: an argument out of range (named) or a bad input.
            TypeError: ``options`` together with a painting keyword given another value (both named), or a keyword
                Paint by Example does not take.
            RuntimeError: NaN or inf in the latents, raised at the step where it appears (the message says where to
                look: the weights, the guidance scale, the precision).
        """
        keywords = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                        keep_unmasked=keep_unmasked, mask_blur=mask_blur, hd_strategy=hd_strategy,
                        resolution=resolution, hd_trigger=hd_trigger, hd_margin=hd_margin)
        self._check_arguments(num_images_per_prompt, output_type, callback_steps, unsupported)
        options, sched = self._options(options, scheduler, keywords)
        if options.keep_unmasked and output_type == "latent":
            raise ValueError("keep_unmasked: pasting pixels back needs decoded images, not output_type='latent'")
        n, guided = num_images_per_prompt, options.guidance > 1.0
        denoise = dict(guidance_scale=options.guidance, eta=options.eta, generator=generator, callback=callback,
                       callback_steps=callback_steps, progress=progress)

        inputs = self._prepare_inputs(image, mask_image)
        _check_generator(generator, inputs.batch, n)
        size = inputs.original_size
        keep_mask = imageio.crop(inputs.keep_mask, size)
        items = regions.plan(size, 1 - keep_mask, strategy=options.hd_strategy, resolution=options.resolution,
                             trigger=options.hd_trigger, margin=options.hd_margin)
        as_is = regions.is_as_is(items, size)
        if not as_is and (output_type == "latent" or latents is not None):
            what = "output_type='latent'" if output_type == "latent" else "latents"
            raise ValueError(f"{what}: a {size[0]}x{size[1]} picture with hd_strategy={options.hd_strategy!r} is "
                             f"painted in {options.resolution}-pixel pieces, with no latent of the whole picture; "
                             f"pass hd_strategy='original' (or hd_trigger >= {max(size)}) to paint it whole")
        context = self._encode_examples(example_image, inputs.batch, n, guided=guided)
        if as_is:
            latents = self._paint(inputs, n, sched.start(options.steps), context, latents=latents, **denoise)
            if output_type == "latent":
                return PaintByExampleOutput(latents)
            result = self._decode(latents, inputs, n, keep_unmasked=options.keep_unmasked, mask_blur=options.mask_blur)
            return _convert(imageio.crop(result, size), output_type)

        # Each item: its crop of the picture and mask at its working size, painted like a small picture on its own.
        pixels = imageio.crop(inputs.pixels, size)
        result = (pixels / 2 + 0.5).repeat(n, 1, 1, 1)  # the input in [0, 1], as _decode's paste-back takes it
        full_keep_mask = keep_mask.repeat(n, 1, 1, 1)
        for item in items:
            crop = PreparedInputs(regions.crop_image(pixels, item),
                                  regions.crop_keep_mask(keep_mask, item), item.size)
            painted_latents = self._paint(crop, n, sched.start(options.steps), context, latents=None, **denoise)
            painted = self._decode(painted_latents, crop, n, keep_unmasked=False, mask_blur=0.0)
            regions.paste(result, painted, full_keep_mask, item, blur_radius=options.mask_blur)
        return _convert(result, output_type)

    def _paint(self, inputs: PreparedInputs, n: int, run: Run, context: torch.Tensor, *,
               latents: torch.Tensor | None, **denoise: Any) -> torch.Tensor:
        """Stage 4 on one picture (or one crop): the random draws 1 and 2, in diffusers' order, then the loop."""
        generator = denoise["generator"]
        latents = self._initial_latents(inputs, n, run.init_noise_sigma, generator=generator, latents=latents)
        masked_latents, latent_mask = self._masked_image_latents(inputs, n, generator=generator)
        return self._denoise(run, latents, masked_latents=masked_latents, latent_mask=latent_mask, context=context,
                             **denoise)

    def _options(self, options: PaintOptions | None, scheduler: Scheduler | str | None,
                 keywords: dict[str, Any]) -> tuple[PaintOptions, Scheduler]:
        """Stage 1: the painting options (from ``options`` or the keywords) and the sampler that runs them, checked
        together before any work; errors name what the caller gave (``num_inference_steps``, or ``steps`` of an
        options object)."""
        if scheduler is not None and not isinstance(scheduler, (str, Scheduler)):
            raise TypeError(f"scheduler: expected a name ({', '.join(SCHEDULERS)}), a Scheduler or None, got "
                            f"{type(scheduler).__name__}")
        if options is not None:
            if not isinstance(options, PaintOptions):
                raise TypeError(f"options: expected a pbe.PaintOptions, got {type(options).__name__}")
            given = {key: value for key, value in keywords.items() if value != _KEYWORD_DEFAULTS[key]}
            given |= {"scheduler": scheduler} if scheduler is not None else {}
            if given:
                key, value = next(iter(given.items()))
                raise TypeError(f"options and {key}={value!r}: give the painting options either as an options "
                                f"object or as keywords, not both")
            sched = options.make_scheduler(self.scheduler_config)
            options.check_run(sched)
            return options, sched
        named = {"scheduler": scheduler} if isinstance(scheduler, str) else {}
        options = PaintOptions.from_pipeline_keywords(**keywords, **named)
        sched = (options.make_scheduler(self.scheduler_config) if named else scheduler) or self.scheduler
        options.check_run(sched, label=PaintOptions.keyword)
        return options, sched

    @staticmethod
    def _check_arguments(n: int, output_type: str, callback_steps: int, unsupported: dict[str, Any]) -> None:
        """Stage 1: refuse bad arguments that are not painting options before any work, each error naming its
        argument."""
        refused = sorted(unsupported.keys() & REFUSED_ARGUMENTS.keys())
        if refused:
            raise TypeError(f"{refused[0]}: {REFUSED_ARGUMENTS[refused[0]]}")
        if unsupported:
            raise TypeError(f"PaintByExample.__call__() got unexpected keyword arguments: "
                            f"{', '.join(sorted(unsupported))}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive integer, got {n!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(callback_steps, int) or callback_steps < 1:
            raise ValueError(f"callback_steps: expected a positive integer, got {callback_steps!r}")

    @staticmethod
    def _prepare_inputs(image: Any, mask_image: Any) -> PreparedInputs:
        """Stage 2: the picture in [-1, 1] and its keep mask, padded to multiples of 8 (the autoencoder's stride)."""
        keep_mask, pixels = imageio.prepare_image_and_mask(image, mask_image)
        original_size = (pixels.shape[-2], pixels.shape[-1])
        pixels, keep_mask = imageio.pad_to_multiple(pixels, keep_mask, multiple=8)
        return PreparedInputs(pixels, keep_mask, original_size)

    def encode_example(self, example_image: Any) -> torch.Tensor:
        """The conditioning token(s) [Bx, 1, D] of one or several example images, in the image encoder's dtype."""
        device, dtype = _placement(self.image_encoder)
        pixels = imageio.preprocess_example(example_image, size=self.image_encoder.config.clip.image_size)
        return self.image_encoder(pixels.to(device, dtype))

    def _encode_examples(self, example_image: Any, batch: int, n: int, *, guided: bool) -> torch.Tensor:
        """Stage 3: the UNet's context, one row per latent ([unconditional rows, conditional rows] when guided)."""
        cond = self.encode_example(example_image)
        if cond.shape[0] not in (1, batch):
            raise ValueError(f"example_image: got {cond.shape[0]} example images for {batch} images; "
                             f"give one example for all of them or one per image")
        # Latents are ordered [image 0..B-1] repeated n times (diffusers' `repeat`); the contexts follow the same order,
        # so image i is always painted with example i. (diffusers interleaves its contexts instead, which pairs images
        # with the wrong examples when B > 1 and n > 1; with one example, or B = 1, both orders are the same.)
        cond = cond.expand(batch, -1, -1).repeat(n, 1, 1)
        if guided:
            uncond = self.image_encoder.uncond_embedding.expand(cond.shape[0], -1, -1)
            cond = torch.cat([uncond.to(cond.dtype), cond])
        return cond.to(*_placement(self.unet))

    def _initial_latents(self, inputs: PreparedInputs, n: int, init_noise_sigma: float, *,
                         generator: Generators, latents: torch.Tensor | None) -> torch.Tensor:
        """Stage 4, denoising, its starting point. Random draw 1: unit Gaussian noise (or the caller's ``latents``)
        times ``init_noise_sigma``, in the UNet's dtype and on its device."""
        device, dtype = _placement(self.unet)
        factor = self.vae.config.downscale
        height, width = inputs.pixels.shape[-2:]
        shape = (inputs.batch * n, self.vae.config.latent_channels, height // factor, width // factor)
        if latents is None:
            latents = randn(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {list(shape)}, got {list(latents.shape)}")
        return latents.to(device, dtype) * init_noise_sigma

    def _masked_image_latents(self, inputs: PreparedInputs, n: int, *,
                              generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 4, denoising, what conditions every step: the masked image's latent and the latent-size keep mask.

        Random draw 2: the latent is a sample of the autoencoder's posterior, not its mean, drawn in the autoencoder's
        dtype; both are then handed over in the UNet's dtype and on its device.
        """
        vae_device, vae_dtype = _placement(self.vae)
        unet_device, unet_dtype = _placement(self.unet)
        masked_pixels = (inputs.pixels * inputs.keep_mask).to(vae_device, vae_dtype)
        masked_latents = self.vae.encode(masked_pixels).sample(generator) * self.vae.config.scaling_factor
        # Reference quirk: the latent-size keep mask is a plain nearest resize of the pixel mask.
        latent_mask = F.interpolate(inputs.keep_mask, size=masked_latents.shape[-2:])
        return (masked_latents.to(unet_device, unet_dtype).repeat(n, 1, 1, 1),
                latent_mask.to(unet_device, unet_dtype).repeat(n, 1, 1, 1))

    def _denoise(
        self,
        run: Run,
        latents: torch.Tensor,
        *,
        masked_latents: torch.Tensor,
        latent_mask: torch.Tensor,
        context: torch.Tensor,
        guidance_scale: float,
        eta: float,
        generator: Generators,
        callback: Callback | None,
        callback_steps: int,
        progress: bool,
    ) -> torch.Tensor:
        """Stage 4, denoising, the loop. The UNet sees [noisy latent, masked-image latent, keep mask] along channels."""
        timesteps = run.timesteps
        order = run.scheduler.order  # diffusers' meaning: model evaluations per reported step
        warmup = len(timesteps) - run.num_inference_steps * order
        # Every step allocates the same tensors again: on the CPU, keep freed memory for the next step instead of taking
        # fresh pages from the kernel (see pbe.memory; the autoencoder runs outside, its few large tensors would
        # fragment it).
        with reuse_freed_memory(latents.device):
            for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising", unit="step")):
                # With guidance the context holds [unconditional, conditional] rows for the same sample: the UNet
                # fans the sample out itself, after the layers the context cannot influence.
                model_input = torch.cat([run.scale_model_input(latents, t), masked_latents, latent_mask], dim=1)
                eps = self.unet(model_input, t, context)
                if guidance_scale > 1.0:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = run.step(eps, t, latents, eta=eta, generator=generator)
                # One reduction per step, negligible next to the UNet (a meta tensor has no values to check).
                if not latents.is_meta and not torch.isfinite(latents).all():
                    raise _not_finite(i, len(timesteps), int(t), guidance_scale, latents.dtype)
                reported = i == len(timesteps) - 1 or (i + 1 > warmup and (i + 1) % order == 0)
                if callback is not None and reported and i % callback_steps == 0:
                    callback(i // order, int(t), latents)
        return latents

    def _decode(self, latents: torch.Tensor, inputs: PreparedInputs, n: int, *, keep_unmasked: bool,
                mask_blur: float) -> torch.Tensor:
        """Stage 5: latents -> images (B * n, 3, H, W) in [0, 1] in the autoencoder's dtype, pasted back if asked."""
        device, dtype = _placement(self.vae)
        decoded = self.vae.decode(latents.to(device, dtype) / self.vae.config.scaling_factor)
        result = (decoded / 2 + 0.5).clamp(0, 1)
        if keep_unmasked:
            original = (inputs.pixels.to(device, dtype) / 2 + 0.5).repeat(n, 1, 1, 1)
            keep_mask = inputs.keep_mask.to(device).repeat(n, 1, 1, 1)
            result = imageio.paste_back(result, original, keep_mask, blur_radius=mask_blur)
        return result


def _convert(images: torch.Tensor, output_type: str) -> PaintByExampleOutput:
    """Stage 5, the end: (N, 3, H, W) images in [0, 1] as ``output_type`` asks ("pt", "np" or "pil")."""
    if output_type == "pt":
        return PaintByExampleOutput(images)
    return PaintByExampleOutput(imageio.to_numpy(images) if output_type == "np" else imageio.to_pil(images))


def _not_finite(step: int, steps: int, timestep: int, guidance_scale: float, dtype: torch.dtype) -> RuntimeError:
    """The error for NaN or inf in the latents: which step, and where to look."""
    causes = ["the weights (a corrupt or wrongly converted checkpoint holds NaN or inf)",
              f"a guidance_scale too large (got {guidance_scale:g}; 5 to 10 is usual)"]
    if dtype in (torch.float16, torch.bfloat16):
        causes.append(f"an overflow of {dtype} (try bf16 or fp32)" if dtype == torch.float16
                      else f"the precision {dtype} (try fp32)")
    return RuntimeError(f"the latents hold NaN or inf after denoising step {step + 1} of {steps} (timestep "
                        f"{timestep}); look at " + ", or ".join(causes))


def _check_generator(generator: Generators, batch: int, n: int) -> None:
    """Refuse, before any network runs, a generator that is not one, or a list of them of the wrong length."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    for one in generators:
        if not isinstance(one, torch.Generator) and not (one is None and generator is None):
            raise TypeError(f"generator: expected a torch.Generator, a list of one per image or None, got "
                            f"{type(one).__name__}")
    if isinstance(generator, (list, tuple)) and len(generator) != batch * n:
        raise ValueError(f"generator: expected a list of {batch * n} generators, one per image painted ({batch} "
                         f"image(s) x num_images_per_prompt {n}), got {len(generator)}")
