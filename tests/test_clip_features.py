"""CLIP's image features (pbe.model.clip.CLIPImageFeatures, weights_convert.clip_features) against transformers'
``CLIPModel.get_image_features`` on stand-in weights: a tiny CLIPModel with random weights, saved as users save one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pbe.errors import CheckpointError
from pbe.evaluation.features import load_clip_features
from pbe.model import CLIPFeaturesConfig, CLIPImageFeatures
from pbe.model.config import clip_vit_b32
from weights_convert.clip_features import convert_clip_features

TINY_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 64, "patch_size": 16}
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1, "num_attention_heads": 2,
             "vocab_size": 50}


def _tiny_clip(folder: Path, *, projection_dim: int = 24, seed: int = 0, **save: object) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=projection_dim))
    with torch.no_grad():  # random LayerNorms and biases too: a mapping mistake must show in the features
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, **save)
    return model.eval()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_features_equal_transformers_get_image_features(tmp_path: Path, safe: bool) -> None:
    reference = _tiny_clip(tmp_path / "clip", safe_serialization=safe)
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "image_embeds", getattr(expected, "pooler_output", expected))
        ours = load_clip_features(tmp_path / "clip")(pixels)
    assert ours.shape == (3, 24)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_the_config_is_read_from_the_folder_and_checked(tmp_path: Path) -> None:
    _tiny_clip(tmp_path / "clip")
    config, state_dict = convert_clip_features(tmp_path / "clip")
    assert config.clip.width == 32 and config.clip.heads == 4 and config.projection_dim == 24
    assert set(state_dict) == set(CLIPImageFeatures(config).state_dict())
    with pytest.raises(CheckpointError, match=r"another size.*width 32 \(expected 768\).*ViT-B/32"):
        convert_clip_features(tmp_path / "clip", config=CLIPFeaturesConfig())


def test_a_weights_file_alone_is_taken_as_vit_b32(tmp_path: Path) -> None:
    _tiny_clip(tmp_path / "clip")
    with pytest.raises(CheckpointError, match=r"another size.*ViT-B/32"):
        convert_clip_features(tmp_path / "clip" / "model.safetensors")
    config = dataclasses.replace(CLIPFeaturesConfig(), clip=dataclasses.replace(
        clip_vit_b32(), width=32, mlp_dim=37, layers=2, heads=4, image_size=64, patch_size=16), projection_dim=24)
    found, _ = convert_clip_features(tmp_path / "clip" / "model.safetensors", config=config)
    assert found == config


def test_a_tower_without_projection_is_refused(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "tower")
    with pytest.raises(CheckpointError, match=r"without its projection \(visual_projection.weight\)"):
        convert_clip_features(tmp_path / "tower")


def test_vit_b32_is_the_default() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # transformers' CLIPVisionConfig defaults are ViT-B/32's (openai/clip-vit-base-patch32), projection 512.
    with torch.device("meta"):
        reference = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512))
        ours = CLIPImageFeatures(CLIPFeaturesConfig())
    expected = {k: v.shape for k, v in convert_shapes(reference).items()}
    assert expected == {k: v.shape for k, v in ours.state_dict().items()}


def convert_shapes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters in our names, through the converter's table (shapes only: a meta-device model)."""
    from weights_convert.mapping import build_keymap
    from weights_convert.tables import CLIP_FEATURES_IGNORED, transformers_clip_features_rules

    source = model.state_dict()
    with torch.device("meta"):
        ours = {k: v.shape for k, v in CLIPImageFeatures(CLIPFeaturesConfig()).state_dict().items()}
    keymap = build_keymap(transformers_clip_features_rules(CLIPFeaturesConfig()), ours,
                          {k: v.shape for k, v in source.items()}, dict(CLIP_FEATURES_IGNORED), origin="reference")
    return {name: source[src] for name, (src, _) in keymap.pairs.items()}
