"""pbe configs from foreign descriptions: diffusers/transformers ``config.json`` files, or the shapes in an LDM checkpoint.

Everything structural is read or derived (number of levels, widths, which levels attend, mapper depth...). Values an
original-layout checkpoint cannot reveal (head counts, GroupNorm groups, epsilons, the latent scaling factor) come from
a given config; without one, from the official config, but ONLY when the structure read from the shapes is the
official one: on any other structure the official head counts would build silently wrong networks, so it is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from pbe.errors import CheckpointError
from pbe.model.config import AutoencoderConfig, CLIPVisionConfig, ImageEncoderConfig, PaintByExampleConfig, UNetConfig


def _require(cfg: dict, key: str, allowed: object, origin: str) -> None:
    value = cfg.get(key, allowed)
    if value != allowed:
        raise CheckpointError(f"{origin}: {key}={value!r} is not supported (Paint by Example uses {allowed!r})")


def unet_config_from_diffusers(cfg: dict, *, origin: str) -> UNetConfig:
    """From a diffusers ``UNet2DConditionModel`` config.json."""
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if not set(down) <= known or not set(up) <= {"CrossAttnUpBlock2D", "UpBlock2D"}:
        raise CheckpointError(f"{origin}: unsupported block types {down} / {up}")
    cross = tuple(t == "CrossAttnDownBlock2D" for t in down)
    if tuple(t == "CrossAttnUpBlock2D" for t in reversed(up)) != cross:
        raise CheckpointError(f"{origin}: up_block_types {up} do not mirror down_block_types {down}")
    for key, allowed in [("use_linear_projection", False), ("transformer_layers_per_block", 1), ("flip_sin_to_cos", True),
                         ("freq_shift", 0), ("act_fn", "silu"), ("class_embed_type", None), ("addition_embed_type", None),
                         ("time_embedding_type", "positional"), ("mid_block_type", "UNetMidBlock2DCrossAttn"),
                         ("upcast_attention", False), ("only_cross_attention", False), ("dual_cross_attention", False),
                         ("num_attention_heads", None), ("resnet_time_scale_shift", "default"), ("downsample_padding", 1),
                         ("mid_block_scale_factor", 1), ("center_input_sample", False)]:
        _require(cfg, key, allowed, origin)
    # diffusers' historic misnomer: `attention_head_dim` holds the number of heads.
    heads = cfg.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise CheckpointError(f"{origin}: per-level head counts {heads} are not supported")
        heads = heads[0]
    layers = cfg.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise CheckpointError(f"{origin}: layers_per_block={layers!r} must be one number")
    return UNetConfig(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], channels=tuple(cfg["block_out_channels"]),
        cross_attention=cross, res_blocks=layers, heads=heads, context_dim=cfg["cross_attention_dim"],
        norm_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
    )


def vae_config_from_diffusers(cfg: dict, *, origin: str) -> AutoencoderConfig:
    """From a diffusers ``AutoencoderKL`` config.json."""
    for key, allowed in [("act_fn", "silu"), ("mid_block_add_attention", True), ("use_quant_conv", True),
                         ("use_post_quant_conv", True)]:
        _require(cfg, key, allowed, origin)
    if cfg.get("in_channels", 3) != cfg.get("out_channels", 3):
        raise CheckpointError(f"{origin}: in_channels and out_channels differ")
    return AutoencoderConfig(
        image_channels=cfg.get("in_channels", 3), latent_channels=cfg.get("latent_channels", 4),
        channels=tuple(cfg["block_out_channels"]), res_blocks=cfg.get("layers_per_block", 1),
        norm_groups=cfg.get("norm_num_groups", 32), scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def image_encoder_config_from_transformers(cfg: dict, *, origin: str) -> ImageEncoderConfig:
    """From the ``image_encoder/config.json`` (a transformers ``CLIPVisionConfig`` plus ``projection_dim``)."""
    _require(cfg, "hidden_act", "quick_gelu", origin)
    _require(cfg, "num_channels", 3, origin)
    layers = cfg["num_hidden_layers"]
    clip = CLIPVisionConfig(
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["hidden_size"], layers=layers,
        heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"], norm_eps=cfg.get("layer_norm_eps", 1e-5),
    )
    # Reference quirk: diffusers derives the mapper depth from the CLIP depth, (24 + 1) // 5 = 5.
    return ImageEncoderConfig(clip=clip, mapper_layers=(layers + 1) // 5, embed_dim=cfg.get("projection_dim", 768))


# transformers' CLIPVisionConfig defaults (5.23): what it assumes for a key a config.json leaves out.
_CLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def clip_config_from_transformers(cfg: dict, *, origin: str) -> CLIPVisionConfig:
    """The vision tower of a transformers ``CLIPVisionModel`` config.json, or of a ``CLIPModel`` one (its
    ``vision_config``)."""
    if cfg.get("model_type", "clip") not in ("clip", "clip_vision_model"):
        raise CheckpointError(f"{origin}: model_type={cfg['model_type']!r}; expected a CLIP model (\"clip\" or "
                              f"\"clip_vision_model\")")
    vision = {**_CLIP_VISION_DEFAULTS, **cfg.get("vision_config", cfg)}
    return image_encoder_config_from_transformers(vision, origin=origin).clip


def clip_config_from_shapes(shapes: dict[str, torch.Size], prefix: str, base: CLIPVisionConfig) -> CLIPVisionConfig:
    """The CLIP tower's structure from its tensor shapes under ``prefix`` (``""`` or ending in a dot); the head count
    and LayerNorm epsilon, which shapes cannot tell, from ``base``. ``KeyError`` naming a tensor that is not there."""
    patch = shapes[f"{prefix}embeddings.patch_embedding.weight"]
    positions = shapes[f"{prefix}embeddings.position_embedding.weight"][0]
    return dataclasses.replace(
        base,
        image_size=patch[-1] * math.isqrt(positions - 1),
        patch_size=patch[-1],
        width=patch[0],
        layers=_count(list(shapes), rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."),
        mlp_dim=shapes[f"{prefix}encoder.layers.0.mlp.fc1.weight"][0],
    )


def _count(keys: list[str], pattern: str) -> int:
    """How many distinct values the one group in ``pattern`` takes among ``keys``."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


# What an original-layout checkpoint cannot tell, as the message refusing a non-official one without a config says it.
UNREADABLE = ("the attention heads of the UNet and of the CLIP tower, the GroupNorm groups and epsilons of the UNet "
              "and the autoencoder, the CLIP LayerNorm epsilon and the latent scaling factor")
HOW_TO_PASS = ("pass the config of the networks: --config (pbe paint / pbe convert) or config= (pbe.load, "
               "PaintByExample.from_pretrained), either a pbe config JSON or a hub-layout folder whose unet/, vae/ and "
               "image_encoder/ hold their config.json")


def structure_differences(config: PaintByExampleConfig, reference: PaintByExampleConfig, *,
                          label: str = "official") -> list[str]:
    """``network.field value (LABEL value)`` for every field of ``config`` that differs from ``reference``."""
    found = []
    for network in ("unet", "vae", "image_encoder"):
        found += field_differences(getattr(config, network), getattr(reference, network), label=label,
                                   prefix=f"{network}.")
    return found


def field_differences(config: object, reference: object, *, label: str, prefix: str = "") -> list[str]:
    """``PREFIXfield value (LABEL value)`` for every field of the config dataclass ``config`` that differs from
    ``reference`` (nested fields dotted)."""
    return [f"{prefix}{name} {value} ({label} {expected})" for name, value, expected in _fields(config, reference)
            if value != expected]


def _fields(config: object, official: object) -> list[tuple[str, object, object]]:
    """(dotted field name, value, official value) of a config dataclass, nested ones flattened."""
    rows = []
    for f in dataclasses.fields(config):
        value, reference = getattr(config, f.name), getattr(official, f.name)
        if dataclasses.is_dataclass(value):
            rows += [(f"{f.name}.{n}", v, r) for n, v, r in _fields(value, reference)]
        else:
            rows.append((f.name, value, reference))
    return rows


def config_from_ldm(shapes: dict[str, torch.Size], base: PaintByExampleConfig | None, *,
                    origin: str) -> PaintByExampleConfig:
    """Read the structure of an original-layout checkpoint from its tensor names and shapes.

    The values the shapes cannot tell come from ``base``; with ``base=None`` from the official config, provided the
    structure is the official one (else ``CheckpointError`` saying what cannot be told and how to pass it).
    """
    if base is not None:
        try:
            return _read_ldm_structure(shapes, base, origin=origin)
        except CheckpointError:
            raise
        except ValueError as err:  # the shapes contradict the head counts / groups of `base`
            raise CheckpointError(f"{origin}: the given config does not fit the checkpoint's shapes ({err})") from None
    # The structure alone, read with head counts and groups of 1 (which divide any width), against the official one.
    official = PaintByExampleConfig()
    neutral = _neutral(official)
    differences = structure_differences(_read_ldm_structure(shapes, neutral, origin=origin), neutral)
    if differences:
        raise CheckpointError(
            f"{origin}: an original-layout checkpoint whose structure is not the official one "
            f"({'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''}). Its weights cannot tell "
            f"{UNREADABLE}, and the official values would build wrong networks: {HOW_TO_PASS}")
    return _read_ldm_structure(shapes, official, origin=origin)


def _neutral(config: PaintByExampleConfig) -> PaintByExampleConfig:
    """``config`` with one head and one GroupNorm group everywhere: it accepts any widths."""
    clip = dataclasses.replace(config.image_encoder.clip, heads=1)
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, heads=1, norm_groups=1),
                               vae=dataclasses.replace(config.vae, norm_groups=1),
                               image_encoder=dataclasses.replace(config.image_encoder, clip=clip))


def _read_ldm_structure(shapes: dict[str, torch.Size], base: PaintByExampleConfig, *,
                        origin: str) -> PaintByExampleConfig:
    """The structure from the shapes, the rest from ``base``. ``ValueError`` where the two contradict each other."""
    keys = list(shapes)
    u = "model.diffusion_model"
    try:
        # input_blocks.{n_res + 1}.0.op is the first downsampler; the input blocks number levels * (n_res + 1).
        first_op = min(int(m.group(1)) for k in keys if (m := re.match(rf"{u}\.input_blocks\.(\d+)\.0\.op\.weight$", k)))
        n_res = first_op - 1
        levels = _count(keys, rf"{u}\.input_blocks\.(\d+)\.") // (n_res + 1)
        block = lambda i: f"{u}.input_blocks.{1 + i * (n_res + 1)}"  # noqa: E731
        unet = dataclasses.replace(
            base.unet,
            in_channels=shapes[f"{u}.input_blocks.0.0.weight"][1],
            out_channels=shapes[f"{u}.out.2.weight"][0],
            channels=tuple(shapes[f"{block(i)}.0.out_layers.3.weight"][0] for i in range(levels)),
            cross_attention=tuple(f"{block(i)}.1.proj_in.weight" in shapes for i in range(levels)),
            res_blocks=n_res,
            context_dim=shapes[f"{u}.middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        )
        v = "first_stage_model.encoder"
        vae_levels = _count(keys, rf"{v}\.down\.(\d+)\.")
        vae = dataclasses.replace(
            base.vae,
            image_channels=shapes[f"{v}.conv_in.weight"][1],
            latent_channels=shapes["first_stage_model.post_quant_conv.weight"][0],
            channels=tuple(shapes[f"{v}.down.{i}.block.0.conv1.weight"][0] for i in range(vae_levels)),
            res_blocks=_count(keys, rf"{v}\.down\.0\.block\.(\d+)\."),
        )
        clip = clip_config_from_shapes(shapes, "cond_stage_model.transformer.vision_model.", base.image_encoder.clip)
        image_encoder = ImageEncoderConfig(
            clip=clip,
            mapper_layers=_count(keys, r"cond_stage_model\.mapper\.resblocks\.(\d+)\."),
            embed_dim=shapes["proj_out.weight"][0],
        )
    except KeyError as err:
        raise CheckpointError(f"{origin}: not a complete Paint by Example checkpoint (cannot find {err})") from None
    return PaintByExampleConfig(unet=unet, vae=vae, image_encoder=image_encoder)
