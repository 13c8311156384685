"""The vision tower of CLIP ViT-L/14 (Radford et al., arXiv 2103.00020; Dosovitskiy et al., arXiv 2010.11929).

Pixels [B, 3, 224, 224] -> 16x16 patches + a class token -> 24 pre-LN transformer layers (quick-GELU MLPs) ->
the post-LayerNorm class token [B, 1024] (Hugging Face's ``pooler_output``). The CLIP projection is not used by
Paint by Example; ``CLIPImageFeatures`` adds it for CLIP's image features (``get_image_features``), which the paper's
metrics compute with ViT-B/32.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from .config import CLIPFeaturesConfig, CLIPVisionConfig
from .layers import LayerNorm, TransformerLayer


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPVisionTower(nn.Module):
    """``tower(pixel_values [B, 3, S, S]) -> pooled [B, width]``."""

    def __init__(self, config: CLIPVisionConfig = CLIPVisionConfig()) -> None:
        super().__init__()
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embed = nn.Parameter(torch.zeros(config.width))
        self.position_embed = nn.Parameter(torch.zeros(num_patches + 1, config.width))
        self.pre_norm = LayerNorm(config.width, eps=config.norm_eps)
        self.layers = nn.ModuleList(
            TransformerLayer(config.width, heads=config.heads, mlp_dim=config.mlp_dim, activation=quick_gelu,
                             eps=config.norm_eps)
            for _ in range(config.layers)
        )
        self.post_norm = LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        patches = rearrange(patches, "b c h w -> b (h w) c")  # one token per patch
        class_token = repeat(self.class_embed, "c -> b 1 c", b=len(pixel_values))
        x = torch.cat([class_token, patches], dim=1) + self.position_embed
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x[:, 0])


class CLIPImageFeatures(nn.Module):
    """``features(pixel_values [B, 3, S, S]) -> [B, projection_dim]``: CLIP's image embedding, not normalised."""

    def __init__(self, config: CLIPFeaturesConfig = CLIPFeaturesConfig()) -> None:
        super().__init__()
        self.config = config
        self.clip = CLIPVisionTower(config.clip)
        self.projection = nn.Linear(config.clip.width, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.clip(pixel_values))
