"""The checkpoints the paper initialises from -> pbe's names, checked like the Paint by Example layouts.

Paint by Example starts training from Stable Diffusion 1.x's UNet and autoencoder and from CLIP ViT-L/14's vision
tower (Yang et al., arXiv 2211.13227, section 4.1). ``convert_stable_diffusion`` reads SD 1.x in either layout: the
original single file (``v1-5-pruned.ckpt`` / ``.safetensors``) or the diffusers folder (``unet/``, ``vae/``).
``convert_clip_vision`` reads a transformers ``CLIPVisionModel`` or ``CLIPModel`` checkpoint: a file, or a folder with
its config.json. Both use the rule tables and checks of the Paint by Example layouts: every source tensor is consumed
or skipped on purpose (SD's text encoder, its EMA copy, the DDPM buffers; CLIP's text tower and projections), every
parameter of the networks of ``config`` is filled once, shapes equal. The UNet keeps SD's input channels here:
widening it to Paint by Example's is the initialisation's step (``pbe.train.init``), not a conversion.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pbe.errors import CheckpointError
from pbe.model import PaintByExampleConfig
from pbe.model.config import CLIPVisionConfig

from . import configs
from .convert import HUB_CONFIG_READERS, Converted, convert_network, our_shapes, read_json
from .mapping import apply, build_keymap, refuse_unexpected
from .readers import read_tensors
from .tables import (CLIP_CONFIG_FILE, CLIP_IGNORED, CLIP_IGNORED_PREFIXES, CLIP_WEIGHT_FILES, HUB_CONFIG_FILES,
                     HUB_WEIGHT_FILES, IGNORED, RULES, SD_IGNORED_PREFIXES, SD_LDM_PREFIXES, TRANSFORMERS_CLIP_TOWERS,
                     sd_ema_ignored, transformers_clip_tower_rules)

SD_NETWORKS = ("unet", "vae")


def sd_config(config: PaintByExampleConfig) -> PaintByExampleConfig:
    """``config`` with the UNet Stable Diffusion has: the same network taking the noisy latent only."""
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=config.vae.latent_channels))


def _ignored_by_prefix(keys: list[str], prefixes: list[tuple[str, str]]) -> dict[str, str]:
    """Each of ``keys`` under one of the (prefix, reason) pairs, with its reason."""
    return {k: why for k in keys for prefix, why in prefixes if k.startswith(prefix)}


def _refuse_other_unet(in_channels: int, config: PaintByExampleConfig, origin: str, *, paint_by_example: bool) -> None:
    """Stable Diffusion 1.x's text-to-image UNet takes the latent alone; name what a UNet taking more is."""
    latent = config.vae.latent_channels
    if in_channels == latent:
        return
    if in_channels == 2 * latent + 1:
        what = "a Paint by Example checkpoint" if paint_by_example else "an inpainting checkpoint (SD-inpainting?)"
        raise CheckpointError(
            f"{origin}: its UNet takes {in_channels} input channels: {what}, not Stable Diffusion 1.x, whose UNet "
            f"takes {latent}; the paper's initialisation widens SD's UNet itself. To fine-tune a Paint by Example "
            f"checkpoint, start from it (init paint-by-example)")
    raise CheckpointError(f"{origin}: its UNet takes {in_channels} input channels; Stable Diffusion 1.x's takes "
                          f"{latent}")


def _with_config_hint(err: CheckpointError, network: str) -> CheckpointError:
    return CheckpointError(f"{err} (checked against the config's {network}: the official Paint by Example structure, "
                           f"which is Stable Diffusion 1.x's, unless config= is given)")


def convert_stable_diffusion(src: str | Path, *, config: PaintByExampleConfig,
                             name: str = "sd_checkpoint") -> Converted:
    """SD 1.x's UNet and autoencoder in our names, for the networks of ``config`` (the UNet taking the latent only).

    ``src``: the original single file, or a diffusers folder with ``unet/`` and ``vae/``. Raises ``CheckpointError``
    naming ``name`` and the path: no such file, no UNet in it, a UNet taking other inputs (a Paint by Example or
    inpainting checkpoint), networks of another structure than ``config``'s, unexpected or missing tensors.
    """
    path = Path(src).expanduser()
    origin = f"{name} {path}"
    if not path.exists():
        raise CheckpointError(f"{origin}: no such file or folder")
    expected = sd_config(config)
    return _sd_folder(path, expected, origin) if path.is_dir() else _sd_single_file(path, expected, origin)


def _sd_folder(folder: Path, expected: PaintByExampleConfig, origin: str) -> Converted:
    found = {}
    for network in SD_NETWORKS:
        path = folder / HUB_CONFIG_FILES[network]
        if not path.is_file():
            raise CheckpointError(f"{origin}: no {HUB_CONFIG_FILES[network]}; expected a diffusers Stable Diffusion "
                                  f"folder (unet/ and vae/) or the original single file")
        found[network] = HUB_CONFIG_READERS[network](read_json(path), origin=str(path))
    paint_by_example = (folder / "image_encoder").is_dir()
    _refuse_other_unet(found["unet"].in_channels, expected, origin, paint_by_example=paint_by_example)
    differences = configs.structure_differences(dataclasses.replace(expected, **found), expected, label="config")
    if differences:
        raise CheckpointError(f"{origin}: its networks differ from the config's ({'; '.join(differences[:4])}"
                              f"{'; ...' if len(differences) > 4 else ''}); pass the matching config=")
    result = Converted(expected, {}, "diffusers")
    for network in SD_NETWORKS:
        names = HUB_WEIGHT_FILES[network]
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            raise CheckpointError(f"{origin}: no {network} weights (looked for {' or '.join(names)})")
        result.state_dicts[network], skipped = convert_network(network, expected, "diffusers", read_tensors(path), {},
                                                               f"{origin}: {path.relative_to(folder)}", None)
        result.sources[network] = str(path)
        result.ignored.update(skipped)
    return result


def _sd_single_file(path: Path, expected: PaintByExampleConfig, origin: str) -> Converted:
    source = read_tensors(path)
    unet_keys = [k for k in source if k.startswith(SD_LDM_PREFIXES["unet"])]
    if not unet_keys:
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in source):
            raise CheckpointError(f"{origin}: a single component in diffusers layout; pass the whole folder "
                                  f"(unet/ and vae/) instead")
        raise CheckpointError(f"{origin}: no Stable Diffusion UNet in it (no {SD_LDM_PREFIXES['unet'][0]}* keys; "
                              f"first keys: {', '.join(sorted(source)[:3]) or 'none'}); expected an SD 1.x checkpoint "
                              f"(v1-5-pruned.ckpt or .safetensors) or a diffusers folder with unet/ and vae/")
    conv_in = next(r for r in RULES["ldm"]["unet"](expected.unet) if r.ours == "conv_in").theirs[0] + ".weight"
    text_encoder = _ignored_by_prefix(list(source), SD_IGNORED_PREFIXES)
    if conv_in in source:
        _refuse_other_unet(source[conv_in].shape[1], expected, origin, paint_by_example=not text_encoder)
    ignored = {**dict(IGNORED["ldm"]["all"]), **dict(sd_ema_ignored(unet_keys)), **text_encoder}
    claimed = tuple(prefix for network in SD_NETWORKS for prefix in SD_LDM_PREFIXES[network])
    refuse_unexpected([k for k in source if not k.startswith(claimed) and k not in ignored], origin=origin)
    result = Converted(expected, {}, "ldm", ignored={k: why for k, why in ignored.items() if k in source})
    for network in SD_NETWORKS:
        part = {k: v for k, v in source.items() if k.startswith(SD_LDM_PREFIXES[network])}
        try:
            result.state_dicts[network], _ = convert_network(network, expected, "ldm", part, ignored, origin, None)
        except CheckpointError as err:
            raise _with_config_hint(err, network) from None
        result.sources[network] = str(path)
    return result


def convert_clip_vision(src: str | Path, *, config: PaintByExampleConfig, name: str = "clip_checkpoint") -> Converted:
    """The CLIP vision tower of a transformers checkpoint as our image encoder's ``clip.*`` parameters.

    ``src``: a ``CLIPVisionModel`` or ``CLIPModel`` weights file (``.safetensors`` / ``.bin``), or a folder holding
    one and its config.json. The tower must be the one of ``config.image_encoder.clip``: a folder's config.json is
    compared field by field, a file's shapes give width, depth, patch, image size and MLP width (the head count cannot
    be read from weights: the config's is used). Raises ``CheckpointError`` naming ``name``, the path and what differs.
    The result's ``state_dicts["image_encoder"]`` holds the tower only.
    """
    path = Path(src).expanduser()
    origin = f"{name} {path}"
    if not path.exists():
        raise CheckpointError(f"{origin}: no such file or folder")
    expected = config.image_encoder.clip
    weights = path
    if path.is_dir():
        config_path = path / CLIP_CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{origin}: a folder without {CLIP_CONFIG_FILE}; expected a transformers CLIP "
                                  f"checkpoint folder, or its weights file")
        _refuse_other_tower(configs.clip_config_from_transformers(read_json(config_path), origin=str(config_path)),
                            config, origin)
        weights = next((path / n for n in CLIP_WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{origin}: no weights file (looked for {' or '.join(CLIP_WEIGHT_FILES)})")
    source = read_tensors(weights)
    shapes = {k: v.shape for k, v in source.items()}
    for tower in TRANSFORMERS_CLIP_TOWERS:
        try:
            found = configs.clip_config_from_shapes(shapes, f"{tower}." if tower else "", expected)
            break
        except KeyError:
            continue
    else:
        raise CheckpointError(f"{origin}: no CLIP vision tower in it (first keys: {', '.join(sorted(source)[:3])}); "
                              f"expected a transformers CLIPVisionModel or CLIPModel checkpoint")
    _refuse_other_tower(found, config, origin)
    ours = {k: v for k, v in our_shapes("image_encoder", config).items() if k.startswith("clip.")}
    ignored = {**dict(CLIP_IGNORED), **_ignored_by_prefix(list(source), CLIP_IGNORED_PREFIXES)}
    keymap = build_keymap(transformers_clip_tower_rules(config.image_encoder), ours, shapes, ignored,
                          origin=f"{origin}: {weights.name}" if weights != path else origin)
    return Converted(config, {"image_encoder": apply(keymap, source)}, "transformers",
                     sources={"image_encoder": str(weights)}, ignored=keymap.ignored)


def _refuse_other_tower(found: CLIPVisionConfig, config: PaintByExampleConfig, origin: str) -> None:
    differences = configs.field_differences(found, config.image_encoder.clip, label="config")
    if differences:
        official = config.image_encoder == PaintByExampleConfig().image_encoder
        raise CheckpointError(f"{origin}: a CLIP vision tower of another size than the config's "
                              f"({'; '.join(differences)})"
                              + ("; Paint by Example uses CLIP ViT-L/14 (width 1024, 24 layers, patch 14)" if official
                                 else ""))
