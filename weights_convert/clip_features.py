"""A transformers CLIP checkpoint -> ``CLIPImageFeatures`` (vision tower + visual projection), checked.

The paper's COCOEE metrics score pictures with CLIP ViT-B/32's image features (``openai/clip-vit-base-patch32``).
``convert_clip_features`` reads a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` checkpoint (a weights file, or a
folder with its config.json) through the same rule table as Paint by Example's CLIP tower plus the projection's rule:
every source tensor is consumed or skipped on purpose (the text side), every parameter filled once, shapes equal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pbe.errors import CheckpointError
from pbe.model import CLIPFeaturesConfig, CLIPImageFeatures

from . import configs
from .convert import read_json
from .mapping import apply, build_keymap
from .readers import read_tensors
from .tables import (CLIP_CONFIG_FILE, CLIP_FEATURES_IGNORED, CLIP_FEATURES_IGNORED_PREFIXES, CLIP_WEIGHT_FILES,
                     TRANSFORMERS_CLIP_TOWERS, transformers_clip_features_rules)

PROJECTION = "visual_projection.weight"  # [projection_dim, width]


def features_config_from_transformers(cfg: dict, *, origin: str) -> CLIPFeaturesConfig:
    """From a ``CLIPModel`` config.json (``vision_config`` + ``projection_dim``) or a
    ``CLIPVisionModelWithProjection`` one (``projection_dim`` among the vision fields)."""
    clip = configs.clip_config_from_transformers(cfg, origin=origin)
    projection_dim = cfg.get("projection_dim", cfg.get("vision_config", {}).get("projection_dim", 512))
    return CLIPFeaturesConfig(clip=clip, projection_dim=projection_dim)


def _config_from_shapes(shapes: dict[str, torch.Size], base: CLIPFeaturesConfig, origin: str) -> CLIPFeaturesConfig:
    for tower in TRANSFORMERS_CLIP_TOWERS:
        try:
            clip = configs.clip_config_from_shapes(shapes, f"{tower}." if tower else "", base.clip)
            break
        except KeyError:
            continue
        except ValueError:  # a width the expected head count does not divide: another model, named below
            width = shapes[f"{tower}.embeddings.patch_embedding.weight" if tower else
                           "embeddings.patch_embedding.weight"][0]
            raise CheckpointError(f"{origin}: a CLIP model of another size than expected (width {width}, expected "
                                  f"{base.clip.width}){_hint(base)}") from None
    else:
        raise CheckpointError(f"{origin}: no CLIP vision tower in it (first keys: {', '.join(sorted(shapes)[:3])}); "
                              f"expected a transformers CLIPModel checkpoint")
    if PROJECTION not in shapes:
        raise CheckpointError(f"{origin}: a CLIP vision tower without its projection ({PROJECTION}); CLIP's image "
                              f"features need a CLIPModel or CLIPVisionModelWithProjection checkpoint")
    return dataclasses.replace(base, clip=clip, projection_dim=shapes[PROJECTION][0])


def _hint(config: CLIPFeaturesConfig) -> str:
    if config != CLIPFeaturesConfig():
        return ""
    return "; the paper's metrics use CLIP ViT-B/32 (a folder with its config.json is read as what it describes)"


def _refuse_other(found: CLIPFeaturesConfig, config: CLIPFeaturesConfig, origin: str) -> None:
    differences = configs.field_differences(found, config, label="expected")
    if differences:
        raise CheckpointError(f"{origin}: a CLIP model of another size than expected ({'; '.join(differences)})"
                              f"{_hint(config)}")


def expected_config(src: str | Path, *, config: CLIPFeaturesConfig | None = None,
                    name: str = "clip_checkpoint") -> CLIPFeaturesConfig:
    """The model a checkpoint will be read as, without reading its weights: ``config`` if given (a folder's
    config.json must describe it), else the folder's config.json, else (a bare weights file) ViT-B/32.
    ``CheckpointError`` for a missing path, a folder without config.json or with another model's."""
    path = Path(src).expanduser()
    origin = f"{name} {path}"
    if not path.exists():
        raise CheckpointError(f"{origin}: no such file or folder")
    if not path.is_dir():
        return config or CLIPFeaturesConfig()
    config_path = path / CLIP_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{origin}: a folder without {CLIP_CONFIG_FILE}; expected a transformers CLIP "
                              f"checkpoint folder, or its weights file")
    described = features_config_from_transformers(read_json(config_path), origin=str(config_path))
    _refuse_other(described, config or described, origin)
    return config or described


def convert_clip_features(src: str | Path, *, config: CLIPFeaturesConfig | None = None,
                          name: str = "clip_checkpoint") -> tuple[CLIPFeaturesConfig, dict[str, torch.Tensor]]:
    """The config and state dict of ``CLIPImageFeatures`` from a transformers CLIP checkpoint file or folder.

    ``config``: the model expected (None: the one a folder's config.json describes; for a bare weights file,
    ViT-B/32, since a file's shapes cannot tell the head count). Raises ``CheckpointError`` naming ``name`` and the
    path: no such file, no vision tower or no projection in it, a model of another size than expected (a folder's
    config.json compared field by field, a file's shapes), unexpected or missing tensors.
    """
    config = expected_config(src, config=config, name=name)
    path = weights = Path(src).expanduser()
    origin = f"{name} {path}"
    if path.is_dir():
        weights = next((path / n for n in CLIP_WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{origin}: no weights file (looked for {' or '.join(CLIP_WEIGHT_FILES)})")
    source = read_tensors(weights)
    shapes = {k: v.shape for k, v in source.items()}
    _refuse_other(_config_from_shapes(shapes, config, origin), config, origin)
    with torch.device("meta"):
        ours = {k: v.shape for k, v in CLIPImageFeatures(config).state_dict().items()}
    ignored = {**dict(CLIP_FEATURES_IGNORED),
               **{k: why for k in source for prefix, why in CLIP_FEATURES_IGNORED_PREFIXES if k.startswith(prefix)}}
    keymap = build_keymap(transformers_clip_features_rules(config), ours, shapes, ignored,
                          origin=f"{origin}: {weights.name}" if weights != path else origin)
    return config, apply(keymap, source)
