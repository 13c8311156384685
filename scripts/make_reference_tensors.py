"""Make pbe's reference tensors and tiny stand-in checkpoints with the REFERENCE stack only (diffusers, transformers).

pbe's own code is never imported here: every number written comes from diffusers 0.42.1 / transformers 5.
Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_reference_tensors.py [--out tests/fixtures]

What it writes under ``--out`` (default ``tests/fixtures``):

* ``reference.safetensors``: inputs and outputs of the tiny components (all float32 except the int64 timesteps and
  the int64 0-d ``*.sample_seed``), keys

  - ``{unet}.{case}.{sample,timestep,context,out}``: ``out = unet(sample, timestep, encoder_hidden_states=context)``;
    guidance-layout cases also store ``{unet}.{case}.shared_sample``, the one sample that ``sample`` repeats;
    ``timestep`` is int64, 0-d where a python int was passed.
  - ``{vae}.{x,mean,logvar,std,sample,sample_seed,z,decoded}``: ``vae.encode(x).latent_dist`` gives ``mean``,
    ``logvar`` (clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does) and ``std = exp(logvar / 2)``;
    ``sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(sample_seed))``
    (``sample_seed`` = 1234, drawn on the CPU in float32); ``decoded = vae.decode(z).sample`` (no scaling factor).
  - ``{encoder}.{pixel_values,out,uncond}``: ``out, uncond = encoder(pixel_values, return_uncond_vector=True)``.
  - ``*_bf16`` (``out_bf16``, ``mean_bf16``, ``logvar_bf16``, ``std_bf16``, ``decoded_bf16``): the same reference
    networks cast to bfloat16 on the bfloat16-rounded inputs, stored as float32: the reference's own bfloat16 error.

* ``hub/`` (unet4 + vae4 + image_encoder) and ``hub_small/`` (unet2 + vae2 + image_encoder1): folders laid out like
  the hub repo ``Fantasy-Studio/Paint-by-Example`` (pickled fp32 ``.bin`` weights; the image encoder's keys in the
  transformers-4 spelling ``model.vision_model.*`` including the int64 ``position_ids`` buffer).

* ``original/model.ckpt``: unet4 + vae4 + image_encoder in the original release's LDM layout, a
  PyTorch-Lightning-style pickle whose ``callbacks`` refer to a class from a module that does not exist at load time,
  like the real release read without pytorch_lightning installed (``load_original_ckpt`` reads it weights-only).
  Every run PROVES this layout: diffusers' own converters (``convert_from_ckpt``) must turn it back into exactly the
  diffusers weights, every original key accounted for. Any mismatch raises.

* ``pipeline_reference.safetensors``: end-to-end runs of diffusers' ``PaintByExamplePipeline`` on the ``hub``
  components (unet4 + vae4 + image_encoder, safety checker off, CLIP preprocessing from the hub
  preprocessor_config.json values), one per ``PIPELINE_CASES`` entry; the metadata key ``"cases"`` holds those
  settings as JSON. Keys:

  - ``inputs.{image0,image1}`` uint8 [40, 56, 3] RGB, ``inputs.example`` uint8 [50, 37, 3] RGB, ``inputs.mask``
    uint8 [40, 56] (255 = repaint, 0 = keep); PIL cases get ``Image.fromarray`` of these.
  - ``{case}.images``: float32 [N, 40, 56, 3] in [0, 1] (``output_type="np"``); ``{case}.latents``: float32
    [N, 4, 5, 7], the final latents of an identical second run (``output_type="latent"``, generator re-seeded).
  - tensor-input cases also store what was passed: ``{case}.image`` float32 [1, 3, H, W] = x / 127.5 - 1,
    ``{case}.mask`` float32 [1, 1, H, W] in {0, 1} (1 = repaint), ``{case}.example`` float32 [1, 3, 32, 32]
    (CLIP-preprocessed pixel values).
  Every run checks shapes, finiteness, that the cases differ and that decoding ``latents`` gives ``images``.

All weights are random (never default init, whose zeroed output layers hide bugs), drawn from a fixed per-component
seed in sorted parameter-name order, so the files are reproducible bit for bit on one machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pickle
import platform
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import diffusers
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.deprecated.paint_by_example import PaintByExamplePipeline
from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
from transformers import CLIPImageProcessor, CLIPVisionConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# The UNet/VAE name table (diffusers key -> original LDM key) of the project's shared notes, committed as a fixture.
TABLE_CANDIDATES = (REPO_ROOT / "tests" / "fixtures" / "ldm_to_diffusers_unet_vae.tsv",
                    REPO_ROOT.parent / "shared" / "ldm_to_diffusers_unet_vae.tsv")

Tensors = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------------------------------
# Tiny components (official structure, tiny widths)
# ---------------------------------------------------------------------------------------------------------------------

UNET_CONFIGS: dict[str, dict] = {
    # Four levels like SD-1, widths changing at levels 1 and 2 like the official 320 -> 640 -> 1280 -> 1280.
    # diffusers' `attention_head_dim` is really the number of heads (2 heads of dim 4/8/16).
    "unet4": dict(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8),
    # Two levels, attention only at the second one (2 heads of dim 16).
    "unet2": dict(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8),
}
VAE_CONFIGS: dict[str, dict] = {
    # Widths change at levels 1 and 2 like the official 128 -> 256 -> 512 -> 512.
    "vae4": dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 32, 32),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 latent_channels=4, layers_per_block=2, norm_num_groups=4, scaling_factor=0.18215, sample_size=32),
    "vae2": dict(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 latent_channels=4, layers_per_block=2, norm_num_groups=4, scaling_factor=0.18215, sample_size=32),
}
CLIP_TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, image_size=32, patch_size=4,
                 projection_dim=24, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Mapper depth = (num_hidden_layers + 1) // 5 in diffusers: 9 layers -> 2 mapper blocks, 4 layers -> 1.
ENCODER_CONFIGS: dict[str, dict] = {
    "image_encoder": dict(CLIP_TINY, num_hidden_layers=9),
    "image_encoder1": dict(CLIP_TINY, num_hidden_layers=4),
}
WEIGHT_SEEDS = {"unet4": 4, "unet2": 2, "vae4": 14, "vae2": 12, "image_encoder": 29, "image_encoder1": 24}

# Which components go into which checkpoint folder.
HUB_FOLDERS = {"hub": ("unet4", "vae4", "image_encoder"), "hub_small": ("unet2", "vae2", "image_encoder1")}


def randomise_(module: nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise scaled so activations stay O(1).

    conv/linear weight ~ N(0,1)/sqrt(fan_in), bias ~ 0.1 N(0,1); norm weight ~ 1 + 0.1 N(0,1), bias ~ 0.1 N(0,1);
    embeddings and CLIP's class embedding ~ 0.5 N(0,1); the unconditional token ~ N(0,1).
    """
    owners = {f"{mod_name}.{p_name}".lstrip("."): (mod, p_name)
              for mod_name, mod in module.named_modules() for p_name, _ in mod.named_parameters(recurse=False)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(owners):
            mod, p_name = owners[name]
            param = getattr(mod, p_name)
            noise = torch.randn(param.shape, generator=generator)
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and p_name == "weight":
                value = noise / param[0].numel() ** 0.5
            elif isinstance(mod, (nn.Conv2d, nn.Linear)) and p_name == "bias":
                value = 0.1 * noise
            elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                value = 1 + 0.1 * noise if p_name == "weight" else 0.1 * noise
            elif isinstance(mod, nn.Embedding) or p_name == "class_embedding":
                value = 0.5 * noise
            elif p_name == "uncond_vector":
                value = noise
            else:
                raise TypeError(f"no randomisation rule for {name} ({type(mod).__name__})")
            param.copy_(value)


def build_components() -> dict[str, nn.Module]:
    """The six tiny reference modules, randomised, eval mode, float32."""
    components: dict[str, nn.Module] = {}
    for name, cfg in UNET_CONFIGS.items():
        components[name] = UNet2DConditionModel(**cfg)
    for name, cfg in VAE_CONFIGS.items():
        components[name] = AutoencoderKL(**cfg)
    for name, cfg in ENCODER_CONFIGS.items():
        components[name] = PaintByExampleImageEncoder(CLIPVisionConfig(**cfg))
    for name, module in components.items():
        randomise_(module, WEIGHT_SEEDS[name])
        module.eval()
        assert all(p.dtype == torch.float32 for p in module.parameters()), name
    return components


# ---------------------------------------------------------------------------------------------------------------------
# Reference tensors
# ---------------------------------------------------------------------------------------------------------------------

# (unet, case): (sample shape, timestep (python int = scalar, list = per-sample tensor), context shape, input seed)
UNET_CASES: dict[tuple[str, str], tuple[tuple[int, ...], int | list[int], tuple[int, ...], int]] = {
    ("unet4", "a"): ((2, 9, 8, 8), 981, (2, 1, 24), 101),
    ("unet4", "b"): ((2, 9, 9, 7), [1, 500], (2, 3, 24), 102),  # latent not divisible by 8, longer context
    ("unet4", "c"): ((1, 9, 8, 12), 21, (1, 1, 24), 103),
    ("unet2", "a"): ((2, 9, 8, 8), 500, (2, 1, 24), 104),
    # Classifier-free guidance layout: one sample, contexts [unconditional, conditional]; diffusers gets the sample
    # repeated to the context's batch (as its pipeline does), pbe may get it once.
    ("unet4", "g"): ((1, 9, 8, 8), 981, (2, 1, 24), 105),
    ("unet2", "g"): ((1, 9, 8, 8), 21, (2, 1, 24), 106),
}
# vae: (latent z shape for decode, input seed); x is always [2, 3, 32, 24] in [-1, 1].
VAE_CASES = {"vae4": ((2, 4, 4, 3), 201), "vae2": ((2, 4, 16, 12), 202)}
VAE_X_SHAPE = (2, 3, 32, 24)
POSTERIOR_SAMPLE_SEED = 1234
ENCODER_INPUT_SEEDS = {"image_encoder": 301, "image_encoder1": 302}


def _unet_references(unet: nn.Module, name: str, case: str, spec: tuple) -> Tensors:
    sample_shape, timestep, context_shape, seed = spec
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(sample_shape, generator=generator)
    context = torch.randn(context_shape, generator=generator)
    t_arg = torch.tensor(timestep, dtype=torch.int64) if isinstance(timestep, list) else timestep
    refs = {}
    if context.shape[0] != sample.shape[0]:  # guidance layout: the sample is shared by the contexts
        refs[f"{name}.{case}.shared_sample"] = sample
        sample = sample.repeat(context.shape[0] // sample.shape[0], 1, 1, 1)
    out = unet(sample, t_arg, encoder_hidden_states=context).sample
    return refs | {f"{name}.{case}.sample": sample, f"{name}.{case}.timestep": torch.tensor(timestep, dtype=torch.int64),
                   f"{name}.{case}.context": context, f"{name}.{case}.out": out}


def _vae_references(vae: AutoencoderKL, name: str, z_shape: tuple[int, ...], seed: int) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(VAE_X_SHAPE, generator=generator) * 2 - 1
    z = torch.randn(z_shape, generator=generator)
    posterior = vae.encode(x).latent_dist
    sample = posterior.sample(generator=torch.Generator().manual_seed(POSTERIOR_SAMPLE_SEED))
    return {f"{name}.x": x, f"{name}.mean": posterior.mean, f"{name}.logvar": posterior.logvar,
            f"{name}.std": posterior.std, f"{name}.sample": sample,
            f"{name}.sample_seed": torch.tensor(POSTERIOR_SAMPLE_SEED, dtype=torch.int64),
            f"{name}.z": z, f"{name}.decoded": vae.decode(z).sample}


def _encoder_references(encoder: nn.Module, name: str, seed: int) -> Tensors:
    size = encoder.config.image_size
    pixel_values = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(seed))
    out, uncond = encoder(pixel_values, return_uncond_vector=True)
    return {f"{name}.pixel_values": pixel_values, f"{name}.out": out, f"{name}.uncond": uncond}


def _bfloat16_references(components: dict[str, nn.Module], refs: Tensors) -> Tensors:
    """The same cases with the reference networks cast to bfloat16 (outputs stored as float32, suffix ``_bf16``).

    They measure how far the REFERENCE itself strays from its float32 result in bfloat16, the yardstick for pbe's
    bfloat16 tolerance on these tiny random networks.
    """
    bf16 = lambda key: refs[key].to(torch.bfloat16)  # noqa: E731
    out: Tensors = {}
    for (name, case), _ in UNET_CASES.items():
        unet = copy.deepcopy(components[name]).to(torch.bfloat16)
        k = f"{name}.{case}"
        timestep = refs[f"{k}.timestep"] if refs[f"{k}.timestep"].ndim else int(refs[f"{k}.timestep"])
        out[f"{k}.out_bf16"] = unet(bf16(f"{k}.sample"), timestep, encoder_hidden_states=bf16(f"{k}.context")).sample.float()
    for name in VAE_CASES:
        vae = copy.deepcopy(components[name]).to(torch.bfloat16)
        posterior = vae.encode(bf16(f"{name}.x")).latent_dist
        for field in ("mean", "logvar", "std"):
            out[f"{name}.{field}_bf16"] = getattr(posterior, field).float()
        out[f"{name}.decoded_bf16"] = vae.decode(bf16(f"{name}.z")).sample.float()
    for name in ENCODER_INPUT_SEEDS:
        encoder = copy.deepcopy(components[name]).to(torch.bfloat16)
        out[f"{name}.out_bf16"] = encoder(bf16(f"{name}.pixel_values")).float()
    return out


def reference_tensors(components: dict[str, nn.Module]) -> Tensors:
    """Run every reference case; returns contiguous detached tensors keyed as in the module docstring."""
    refs: Tensors = {}
    with torch.no_grad():
        for (name, case), spec in UNET_CASES.items():
            refs |= _unet_references(components[name], name, case, spec)
        for name, (z_shape, seed) in VAE_CASES.items():
            refs |= _vae_references(components[name], name, z_shape, seed)
        for name, seed in ENCODER_INPUT_SEEDS.items():
            refs |= _encoder_references(components[name], name, seed)
        refs |= _bfloat16_references(components, refs)
    refs = {k: v.detach().contiguous() for k, v in refs.items()}
    for key, value in refs.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            magnitude = value.abs().max().item()
            if not (torch.isfinite(value).all() and magnitude < 1e3):
                raise ValueError(f"reference {key} is badly scaled: max |x| = {magnitude}")
    return refs


# ---------------------------------------------------------------------------------------------------------------------
# Hub layout (Fantasy-Studio/Paint-by-Example)
# ---------------------------------------------------------------------------------------------------------------------

def plain_state_dict(module: nn.Module) -> Tensors:
    """Detached, contiguous, independent fp32 copies of a module's state dict."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def clip_tower_prefix(encoder: PaintByExampleImageEncoder) -> str:
    """'' in transformers 5 (CLIPVisionModel's keys start at `embeddings.`), 'vision_model.' in transformers 4."""
    return "vision_model." if any(k.startswith("vision_model.") for k in encoder.model.state_dict()) else ""


def position_ids(config: CLIPVisionConfig) -> torch.Tensor:
    """The int64 [1, num_positions] buffer transformers 4 saved with CLIP (non-persistent in transformers 5)."""
    num_positions = (config.image_size // config.patch_size) ** 2 + 1
    return torch.arange(num_positions, dtype=torch.int64)[None].contiguous()


def encoder_state_dict_transformers4(encoder: PaintByExampleImageEncoder) -> Tensors:
    """The image encoder's state dict as the hub `.bin` spells it: `model.vision_model.*` plus `position_ids`."""
    live_prefix = "model." + clip_tower_prefix(encoder)
    out: Tensors = {}
    for key, value in plain_state_dict(encoder).items():
        out["model.vision_model." + key[len(live_prefix):] if key.startswith(live_prefix) else key] = value
    out["model.vision_model.embeddings.position_ids"] = position_ids(encoder.config)
    return out


def model_index() -> dict:
    return {
        "_class_name": "PaintByExamplePipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def scheduler_config() -> dict:
    """The official PNDM scheduler_config.json values."""
    return {
        "_class_name": "PNDMScheduler", "_diffusers_version": diffusers.__version__,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    }


def preprocessor_config(image_size: int) -> dict:
    """CLIPImageProcessor config with the official values, except the tiny image size."""
    return {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_hub_folder(folder: Path, unet: UNet2DConditionModel, vae: AutoencoderKL,
                     encoder: PaintByExampleImageEncoder) -> None:
    _write_json(folder / "model_index.json", model_index())
    for sub, model in (("unet", unet), ("vae", vae)):
        model.save_config(folder / sub)
        torch.save(plain_state_dict(model), folder / sub / "diffusion_pytorch_model.bin")
    # Like the hub file: only the non-default CLIPVisionConfig fields, the architecture and the dtype.
    encoder_config = encoder.config.to_diff_dict() | {"architectures": ["PaintByExampleImageEncoder"],
                                                      "torch_dtype": "float32"}
    _write_json(folder / "image_encoder" / "config.json", encoder_config)
    torch.save(encoder_state_dict_transformers4(encoder), folder / "image_encoder" / "pytorch_model.bin")
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config())
    _write_json(folder / "feature_extractor" / "preprocessor_config.json",
                preprocessor_config(encoder.config.image_size))


def check_hub_folder(folder: Path, unet: nn.Module, vae: nn.Module, encoder: PaintByExampleImageEncoder) -> None:
    """The reference stack must load each written component folder back to the same weights (configs included)."""
    saved = torch.load(folder / "image_encoder" / "pytorch_model.bin", weights_only=True)
    assert_exact(saved, encoder_state_dict_transformers4(encoder), f"{folder.name}/image_encoder")
    for sub, model, cls in (("unet", unet, UNet2DConditionModel), ("vae", vae, AutoencoderKL),
                            ("image_encoder", encoder, PaintByExampleImageEncoder)):
        loaded = cls.from_pretrained(folder / sub, use_safetensors=False)
        assert_exact(plain_state_dict(loaded), plain_state_dict(model), f"{folder.name}/{sub} reloaded")


# ---------------------------------------------------------------------------------------------------------------------
# Original LDM layout (the release model.ckpt)
# ---------------------------------------------------------------------------------------------------------------------

def read_table(path: Path) -> list[tuple[str, str, int]]:
    """Rows (diffusers key with unet./vae. prefix, original key, ndim of the original tensor)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        diffusers_key, original_key, shape = line.split("\t")
        rows.append((diffusers_key, original_key, len(json.loads(shape))))
    return rows


def ddpm_buffers(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensors:
    """The schedule buffers LDM's DDPM.register_schedule stores (float64 maths, saved as float32)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.to(torch.float32).contiguous() for k, v in buffers.items()}


# mapper block names: original (ldm/modules/encoders/xf.py) -> diffusers BasicTransformerBlock; c_qkv is fused.
MAPPER_NAMES = {"ln_1": ["norm1"], "attn.c_qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"],
                "attn.c_proj": ["attn1.to_out.0"], "ln_2": ["norm3"], "mlp.c_fc": ["ff.net.0.proj"],
                "mlp.c_proj": ["ff.net.2"]}


def original_unet_vae_state_dict(unet: nn.Module, vae: nn.Module, table: list[tuple[str, str, int]]) -> Tensors:
    """The UNet and autoencoder of a latent-diffusion checkpoint (`model.diffusion_model.*`, `first_stage_model.*`) for
    these diffusers weights, by `table`; every tensor is an independent copy. Stable Diffusion 1.x files use the same
    names (tests/test_train_init.py builds its SD stand-in with this)."""
    sources = {"unet": plain_state_dict(unet), "vae": plain_state_dict(vae)}
    out: Tensors = {}
    for diffusers_key, original_key, original_ndim in table:
        component, key = diffusers_key.split(".", 1)
        if key not in sources[component]:
            # Only a level-change shortcut conv may be absent, where a tiny width does not change (today none is).
            assert "shortcut" in key, f"tiny {component} lacks {key}"
            continue
        value = sources[component][key]
        if original_ndim == 4 and value.ndim == 2:  # VAE mid attention: diffusers Linear -> original 1x1 conv
            value = value[:, :, None, None]
        assert value.ndim == original_ndim, (diffusers_key, tuple(value.shape), original_ndim)
        out[original_key] = value.clone().contiguous()
    used = {row[0] for row in table}
    for component, sd in sources.items():
        missing = sorted(k for k in sd if f"{component}.{k}" not in used)
        assert not missing, f"{component} keys not in the table: {missing[:5]}"
    return out


def original_state_dict(unet: nn.Module, vae: nn.Module, encoder: PaintByExampleImageEncoder,
                        table: list[tuple[str, str, int]]) -> Tensors:
    """The release checkpoint's `state_dict` for these weights; every tensor is an independent copy."""
    out = original_unet_vae_state_dict(unet, vae, table)
    enc = plain_state_dict(encoder)
    tower = "model." + clip_tower_prefix(encoder)
    for key, value in enc.items():
        if key.startswith(tower):
            out["cond_stage_model.transformer.vision_model." + key[len(tower):]] = value
    out["cond_stage_model.transformer.vision_model.embeddings.position_ids"] = position_ids(encoder.config)
    for i in range(len(encoder.mapper.blocks)):
        for original, diffusers_names in MAPPER_NAMES.items():
            for suffix in ("weight", "bias"):
                parts = [enc[f"mapper.blocks.{i}.{n}.{suffix}"] for n in diffusers_names]
                out[f"cond_stage_model.mapper.resblocks.{i}.{original}.{suffix}"] = torch.cat(parts, dim=0)
    for suffix in ("weight", "bias"):
        out[f"cond_stage_model.final_ln.{suffix}"] = enc[f"final_layer_norm.{suffix}"]
        out[f"proj_out.{suffix}"] = enc[f"proj_out.{suffix}"]
    out["learnable_vector"] = enc["uncond_vector"]
    out |= ddpm_buffers()
    return out


def assert_exact(actual: Tensors, expected: Tensors, what: str) -> None:
    """Same key set and bit-identical tensors (dtype and shape included), or raise."""
    if set(actual) != set(expected):
        raise AssertionError(f"{what}: key sets differ; only in actual {sorted(set(actual) - set(expected))[:5]}, "
                             f"only in expected {sorted(set(expected) - set(actual))[:5]}")
    bad = [k for k in expected if not (actual[k].dtype == expected[k].dtype and torch.equal(actual[k], expected[k]))]
    if bad:
        raise AssertionError(f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}")


@contextmanager
def _offline_clip_config(config: CLIPVisionConfig) -> Iterator[None]:
    """Make convert_paint_by_example_checkpoint build on `config` instead of asking the hub for ViT-L/14's."""
    from diffusers.pipelines.stable_diffusion import convert_from_ckpt

    class OfflineConfig:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> CLIPVisionConfig:
            return CLIPVisionConfig(**config.to_dict())

    original = convert_from_ckpt.CLIPVisionConfig
    convert_from_ckpt.CLIPVisionConfig = OfflineConfig
    try:
        yield
    finally:
        convert_from_ckpt.CLIPVisionConfig = original


def _shares_storage_with(converted: Tensors, original: Tensors) -> set[str]:
    """Original keys whose storage some converted tensor views (the UNet/VAE converters rename without copying)."""
    by_pointer = {v.untyped_storage().data_ptr(): k for k, v in original.items()}
    assert len(by_pointer) == len(original), "original tensors must not share storage"
    return {by_pointer[v.untyped_storage().data_ptr()] for v in converted.values()
            if v.untyped_storage().data_ptr() in by_pointer}


def prove_original_layout(original: Tensors, unet: nn.Module, vae: nn.Module,
                          encoder: PaintByExampleImageEncoder) -> None:
    """diffusers' own converters must map `original` back to exactly our diffusers weights, using every key."""
    from diffusers.pipelines.stable_diffusion import convert_from_ckpt as cfc

    unet_new = cfc.convert_ldm_unet_checkpoint(dict(original), dict(unet.config))  # pops from its argument
    assert_exact(unet_new, plain_state_dict(unet), "original -> unet (diffusers convert_ldm_unet_checkpoint)")
    vae_new = cfc.convert_ldm_vae_checkpoint(dict(original), dict(vae.config))
    assert_exact(vae_new, plain_state_dict(vae), "original -> vae (diffusers convert_ldm_vae_checkpoint)")

    # The Paint-by-Example rules predate transformers 5: give them the tiny config, and present the CLIP tower keys
    # the way the installed transformers names them (no `vision_model.` level in 5, position_ids no longer saved).
    tower = "cond_stage_model.transformer.vision_model."
    live = "cond_stage_model.transformer." + clip_tower_prefix(encoder)
    adapted = {(live + k[len(tower):] if k.startswith(tower) else k): v for k, v in original.items()}
    live_tower_keys = {k.removeprefix(clip_tower_prefix(encoder)) for k in encoder.model.state_dict()}
    if "embeddings.position_ids" not in live_tower_keys:
        del adapted[live + "embeddings.position_ids"]
    with _offline_clip_config(encoder.config):
        encoder_new = cfc.convert_paint_by_example_checkpoint(adapted)
    assert_exact(plain_state_dict(encoder_new), plain_state_dict(encoder), "original -> image encoder")

    # Coverage. UNet/VAE: exactly the keys whose storage the converters' outputs view (they rename without copying).
    # Encoder: the converter loads the tower and mapper groups strictly and reads the other three names one by one,
    # so the remaining keys must be exactly those groups, those names and the DDPM buffers it ignores on purpose.
    covered = _shares_storage_with(unet_new, original) | _shares_storage_with(vae_new, original)
    unet_vae = {k for k in original if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    if covered != unet_vae:
        raise AssertionError(f"UNet/VAE keys not consumed exactly: {sorted(unet_vae ^ covered)[:5]}")
    by_name = {"cond_stage_model.final_ln.weight", "cond_stage_model.final_ln.bias", "proj_out.weight",
               "proj_out.bias", "learnable_vector"}
    grouped = {k for k in original if k.startswith(("cond_stage_model.transformer.", "cond_stage_model.mapper."))}
    leftover = set(original) - unet_vae - grouped - by_name - set(ddpm_buffers())
    if leftover or not by_name <= set(original):
        raise AssertionError(f"unaccounted original keys: {sorted(leftover)[:5]}")


@contextmanager
def _fake_lightning() -> Iterator[type]:
    """A throwaway `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, gone again on exit."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    assert not any(n in sys.modules for n in names), "a real pytorch_lightning is imported; refusing to shadow it"
    modules = [types.ModuleType(n) for n in names]
    model_checkpoint_cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[-1].ModelCheckpoint = model_checkpoint_cls
    modules[0].callbacks, modules[1].model_checkpoint = modules[1], modules[2]
    sys.modules.update(zip(names, modules))
    try:
        yield model_checkpoint_cls
    finally:
        for n in names:
            del sys.modules[n]


LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def write_original(folder: Path, original: Tensors) -> None:
    """`model.ckpt`: a Lightning-1.4-style pickle with an unimportable callback class, like the release."""
    folder.mkdir(parents=True, exist_ok=True)
    with _fake_lightning() as ModelCheckpoint:
        callback = ModelCheckpoint()
        callback.monitor, callback.best_model_path = None, "logs/checkpoints/last.ckpt"
        # Lightning 1.4 keyed callback states by the callback class; the instance makes the trap unmistakable.
        checkpoint = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.4.2", "state_dict": original,
                      "callbacks": {ModelCheckpoint: {"best_model_score": None, "instance": callback}}}
        torch.save(checkpoint, folder / "model.ckpt")


class _StandInCallback:
    """Receives the pickled Lightning callback (class reference and instance state) in place of the real class."""


def load_original_ckpt(path: Path) -> Tensors:
    """The `state_dict` of a `model.ckpt` written by `write_original`, read weights-only (no pickled code runs).

    The Lightning callback class is allow-listed under its pickled name as an inert stand-in, so neither
    pytorch_lightning nor a fake module is needed. Every tensor comes back with its own storage.
    """
    with torch.serialization.safe_globals([(_StandInCallback, LIGHTNING_CALLBACK)]):
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    assert any(cls is _StandInCallback for cls in checkpoint["callbacks"]), "the Lightning callback is missing"
    return {k: v.clone() for k, v in checkpoint["state_dict"].items()}


def check_original(folder: Path, original: Tensors) -> None:
    """`model.ckpt` holds `original` and refuses plain loading like the real release (no pytorch_lightning)."""
    traps: list[tuple[bool, type[Exception]]] = [(True, pickle.UnpicklingError)]
    if importlib.util.find_spec("pytorch_lightning") is None:
        traps.append((False, ModuleNotFoundError))
    for weights_only, error in traps:
        try:
            torch.load(folder / "model.ckpt", weights_only=weights_only)
        except error:
            continue
        raise AssertionError(f"model.ckpt loads with weights_only={weights_only}; the Lightning trap is missing")
    assert_exact(load_original_ckpt(folder / "model.ckpt"), original, "original/model.ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# End-to-end pipeline references (diffusers' PaintByExamplePipeline on unet4 + vae4 + image_encoder)
# ---------------------------------------------------------------------------------------------------------------------

PIPELINE_HEIGHT, PIPELINE_WIDTH = 40, 56  # a multiple of 8 but not of 64, not square
EXAMPLE_HEIGHT, EXAMPLE_WIDTH = 50, 37  # another size and aspect: CLIP preprocessing resizes and crops it
MASK_BOX = (slice(10, 30), slice(13, 43))  # rows, columns painted 255 (= repaint); not aligned to the 8-pixel latents
SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "lms": LMSDiscreteScheduler}


def _case(scheduler: str, seed: int, *, guidance: float = 5.0, steps: int = 3, eta: float = 0.0,
          num_images_per_prompt: int = 1, inputs: str = "pil", images: tuple[str, ...] = ("image0",),
          shared_example: bool = False) -> dict:
    return {"scheduler": scheduler, "steps": steps, "guidance": guidance, "eta": eta,
            "num_images_per_prompt": num_images_per_prompt, "seed": seed, "inputs": inputs, "images": list(images),
            "shared_example": shared_example}


# `shared_example`: pbe is given ONE example for all images; diffusers needs it repeated once per image.
PIPELINE_CASES: dict[str, dict] = {
    "pndm_guided": _case("pndm", 0),
    "pndm_unguided": _case("pndm", 1, guidance=1.0),
    "ddim_guided": _case("ddim", 2),
    "ddim_eta": _case("ddim", 3, eta=0.7),  # DDIM draws fresh noise from the generator at every step
    "ddim_unguided": _case("ddim", 4, guidance=1.0),
    "lms_guided": _case("lms", 5),
    "lms_unguided": _case("lms", 6, guidance=1.0),
    "pndm_two_per_prompt": _case("pndm", 7, num_images_per_prompt=2),
    "pndm_batch_shared_example": _case("pndm", 8, images=("image0", "image1"), shared_example=True),
    "pndm_tensor_inputs": _case("pndm", 9, inputs="tensor"),
    "pndm_ten_steps": _case("pndm", 10, steps=10),  # PNDM (PLMS) repeats its first timestep: 11 UNet calls
}


def synthetic_picture(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB [H, W, 3] picture: a smooth per-channel gradient with a ripple, plus three flat rectangles."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    slope_y, slope_x, phase = rng.uniform(-1.0, 1.0, size=(3, 3))
    picture = 0.5 + 0.3 * (slope_y * (y - 0.5) + slope_x * (x - 0.5)) + 0.1 * np.sin(6.0 * (x + y) + 3.0 * phase)
    for _ in range(3):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        bottom, right = top + rng.integers(4, height // 2), left + rng.integers(4, width // 2)
        picture[top:bottom, left:right] = rng.uniform(0.05, 0.95, size=3)
    return np.clip(np.rint(picture * 255.0), 0, 255).astype(np.uint8)


def pipeline_inputs() -> dict[str, np.ndarray]:
    """uint8 inputs: images [H, W, 3], example [50, 37, 3], mask [H, W] with 255 = repaint, 0 = keep."""
    mask = np.zeros((PIPELINE_HEIGHT, PIPELINE_WIDTH), dtype=np.uint8)
    mask[MASK_BOX] = 255
    return {"image0": synthetic_picture(PIPELINE_HEIGHT, PIPELINE_WIDTH, seed=400),
            "image1": synthetic_picture(PIPELINE_HEIGHT, PIPELINE_WIDTH, seed=401),
            "example": synthetic_picture(EXAMPLE_HEIGHT, EXAMPLE_WIDTH, seed=402),
            "mask": mask}


def clip_image_processor(image_size: int) -> CLIPImageProcessor:
    """transformers' PIL-backend CLIP preprocessing with the hub preprocessor_config.json values."""
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", CLIPImageProcessor)
    return processor_cls.from_dict(preprocessor_config(image_size))


def reference_scheduler(name: str) -> PNDMScheduler | DDIMScheduler | LMSDiscreteScheduler:
    """A fresh scheduler of kind `name` built from the official PNDM scheduler_config.json values."""
    return SCHEDULERS[name].from_config(scheduler_config())


def reference_pipeline(components: dict[str, nn.Module]) -> PaintByExamplePipeline:
    """diffusers' pipeline on the `hub` components (unet4, vae4, image_encoder), PNDM, no safety checker."""
    encoder = components["image_encoder"]
    pipe = PaintByExamplePipeline(
        vae=components["vae4"], image_encoder=encoder, unet=components["unet4"], scheduler=reference_scheduler("pndm"),
        safety_checker=None, feature_extractor=clip_image_processor(encoder.config.image_size),
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tensor_inputs(pictures: dict[str, np.ndarray], processor: CLIPImageProcessor) -> Tensors:
    """pbe/diffusers tensor conventions: image in [-1, 1], mask in {0, 1} with 1 = repaint, CLIP pixel values."""
    image = torch.from_numpy(pictures["image0"]).permute(2, 0, 1)[None].to(torch.float32) / 127.5 - 1
    mask = torch.from_numpy(pictures["mask"])[None, None].to(torch.float32) / 255
    example = processor(images=Image.fromarray(pictures["example"]), return_tensors="pt").pixel_values
    return {"image": image.contiguous(), "mask": mask.contiguous(), "example": example.to(torch.float32).contiguous()}


def pipeline_references(components: dict[str, nn.Module]) -> tuple[Tensors, dict]:
    """Run every PIPELINE_CASES case through diffusers twice (output_type "np" and "latent", same seed).

    Returns the tensors (``inputs.{image0,image1,example,mask}`` uint8; per case ``{case}.images`` float32
    [N, H, W, 3] in [0, 1] and ``{case}.latents`` float32 [N, 4, H/8, W/8], plus ``{case}.{image,mask,example}`` for
    tensor-input cases) and the JSON-able case settings.
    """
    pictures = pipeline_inputs()
    pil = {name: Image.fromarray(array) for name, array in pictures.items()}
    refs: Tensors = {f"inputs.{name}": torch.from_numpy(array.copy()) for name, array in pictures.items()}
    pipe = reference_pipeline(components)
    for case, settings in PIPELINE_CASES.items():
        if settings["inputs"] == "tensor":
            tensors = _tensor_inputs(pictures, pipe.feature_extractor)
            refs |= {f"{case}.{name}": value for name, value in tensors.items()}
            call_inputs = {"image": tensors["image"].clone(), "mask_image": tensors["mask"].clone(),
                           "example_image": tensors["example"].clone()}
        elif len(settings["images"]) == 1:
            call_inputs = {"image": pil[settings["images"][0]], "mask_image": pil["mask"],
                           "example_image": pil["example"]}
        else:
            # diffusers pairs the i-th example with the i-th image and cannot broadcast one example: repeat it.
            count = len(settings["images"])
            call_inputs = {"image": [pil[name] for name in settings["images"]], "mask_image": [pil["mask"]] * count,
                           "example_image": [pil["example"]] * count}
        for output_type, suffix in (("np", "images"), ("latent", "latents")):
            pipe.scheduler = reference_scheduler(settings["scheduler"])  # fresh: PNDM and LMS keep step history
            result = pipe(**call_inputs, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                          eta=settings["eta"], num_images_per_prompt=settings["num_images_per_prompt"],
                          generator=torch.Generator().manual_seed(settings["seed"]), output_type=output_type).images
            refs[f"{case}.{suffix}"] = torch.as_tensor(result).detach().to(torch.float32).contiguous()
    check_pipeline_references(refs, components["vae4"])
    return refs, {case: dict(settings) for case, settings in PIPELINE_CASES.items()}


def check_pipeline_references(refs: Tensors, vae: AutoencoderKL) -> None:
    """Shapes, finiteness, pairwise-different cases, and the np run == decode(latent run)."""
    scale = vae.config.scaling_factor
    for case, settings in PIPELINE_CASES.items():
        count = len(settings["images"]) * settings["num_images_per_prompt"]
        images, latents = refs[f"{case}.images"], refs[f"{case}.latents"]
        assert images.shape == (count, PIPELINE_HEIGHT, PIPELINE_WIDTH, 3), (case, images.shape)
        assert latents.shape == (count, 4, PIPELINE_HEIGHT // 8, PIPELINE_WIDTH // 8), (case, latents.shape)
        assert torch.isfinite(images).all() and torch.isfinite(latents).all(), case
        assert images.min() >= 0 and images.max() <= 1, case
        with torch.no_grad():
            decoded = (vae.decode(latents / scale).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert torch.allclose(decoded, images, rtol=0, atol=1e-5), f"{case}: np run != decode(latent run)"
        for i in range(1, count):  # different noise (or image) for every batch entry
            assert not torch.allclose(images[0], images[i], atol=1e-3), f"{case}: batch entries {0}, {i} agree"
    cases = list(PIPELINE_CASES)
    for i, first in enumerate(cases):
        for second in cases[i + 1:]:
            a, b = refs[f"{first}.latents"], refs[f"{second}.latents"]
            if a.shape == b.shape and torch.allclose(a, b, atol=1e-3):
                raise AssertionError(f"pipeline cases {first} and {second} agree")


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

@contextmanager
def reference_threads() -> Iterator[None]:
    """Compute on ONE CPU thread, then restore the previous count.

    Multithreaded CPU kernels split their sums by thread count, and the results differ by ~1e-6 relative between 1 and
    2 threads (more after the pipeline's steps); one thread makes the numbers independent of the machine's core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_signature() -> str:
    """The CPU the fixtures are computed on: model name and the vector/matrix features that pick float kernels.

    Stored in both reference files' metadata under "machine". Float32 and bfloat16 kernels round differently on
    different CPUs (AVX2, AVX-512, AMX), so tests compare a fixture against a live recomputation tightly only when the
    signatures match (tests/test_reference_live.py).
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: the model name alone
        pass
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    # Variables that cap the instruction set PyTorch's and oneDNN's kernels use make another "machine" of this one.
    caps = [f"{name}={os.environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
            if os.environ.get(name)]
    return " ".join([model, *features, *caps, f"torch-{torch.__version__}"])


def cases_json(cases: dict) -> str:
    """The pipeline case settings as stored under the "cases" key of pipeline_reference.safetensors' metadata."""
    return json.dumps(cases, sort_keys=True)


def find_table(explicit: Path | None) -> Path:
    for candidate in ([explicit] if explicit else TABLE_CANDIDATES):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"ldm_to_diffusers_unet_vae.tsv not found (tried {explicit or TABLE_CANDIDATES})")


def write_all(out: Path, *, components: dict[str, nn.Module], table: list[tuple[str, str, int]]) -> None:
    """Write and check every fixture file under `out`."""
    machine = machine_signature()
    save_file(reference_tensors(components), out / "reference.safetensors", metadata={"machine": machine})

    for folder, (unet, vae, encoder) in HUB_FOLDERS.items():
        write_hub_folder(out / folder, components[unet], components[vae], components[encoder])
        check_hub_folder(out / folder, components[unet], components[vae], components[encoder])

    unet, vae, encoder = (components[n] for n in HUB_FOLDERS["hub"])
    original = original_state_dict(unet, vae, encoder, table)
    write_original(out / "original", original)
    check_original(out / "original", original)
    prove_original_layout(load_original_ckpt(out / "original" / "model.ckpt"), unet, vae, encoder)

    pipeline_refs, cases = pipeline_references(components)
    save_file(pipeline_refs, out / "pipeline_reference.safetensors", metadata={"cases": cases_json(cases), "machine": machine})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "fixtures")
    parser.add_argument("--table", type=Path, default=None, help="ldm_to_diffusers_unet_vae.tsv")
    args = parser.parse_args(argv)
    table = read_table(find_table(args.table))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    with reference_threads():
        write_all(out, components=build_components(), table=table)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB); original layout proven against diffusers' converters")


if __name__ == "__main__":
    main()
