"""Paint by Example's example-image encoder: the conditioning token the UNet cross-attends to.

Yang et al., "Paint by Example" (arXiv 2211.13227), section 3.2: only CLIP's class token is kept (an information
bottleneck that stops the model from copy-pasting the example), refined by a small single-head transformer
("mapper"), normalised and projected to the UNet's context width. A learned token stands in for "no example" in
classifier-free guidance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .clip import CLIPVisionTower
from .config import ImageEncoderConfig
from .layers import LayerNorm, TransformerLayer


class ImageEncoder(nn.Module):
    """``encoder(pixel_values [B, 3, 224, 224]) -> context [B, 1, 768]``; ``encoder.uncond_embedding`` is [1, 1, 768]."""

    def __init__(self, config: ImageEncoderConfig = ImageEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        width = config.clip.width
        self.clip = CLIPVisionTower(config.clip)
        # Single-head blocks with exact (erf) GELU, unlike CLIP's quick-GELU.
        self.mapper = nn.ModuleList(
            TransformerLayer(width, heads=1, mlp_dim=4 * width, activation=F.gelu, eps=1e-5)
            for _ in range(config.mapper_layers)
        )
        self.final_norm = LayerNorm(width)
        self.proj = nn.Linear(width, config.embed_dim)
        self.uncond_embedding = nn.Parameter(torch.zeros(1, 1, config.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip(pixel_values))

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The part trained with the UNet: CLIP's pooled class token [B, width] -> context [B, 1, embed_dim]."""
        x = rearrange(pooled, "b c -> b 1 c")  # the pooled class token is a sequence of one
        for block in self.mapper:
            x = block(x)
        return self.proj(self.final_norm(x))
