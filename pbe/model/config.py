"""Configurations of the three Paint by Example networks.

Every default is the value of the official checkpoint (``Fantasy-Studio/Paint-by-Example``), so ``UNetConfig()``
builds the real UNet. Small variants for tests and research are ``dataclasses.replace`` of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 9  # noisy latent (4) + masked-image latent (4) + keep mask (1)
    out_channels: int = 4  # predicted noise, one channel per latent channel
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level, finest first
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # which down levels carry a transformer
    # (the up path mirrors them; the middle block always has one)
    res_blocks: int = 2  # residual blocks per down level; each up level has one more
    heads: int = 8  # attention heads in every transformer (head dim = level width / heads)
    context_dim: int = 768  # width of the conditioning tokens
    norm_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm epsilon of the residual blocks and the output norm

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding: four times the first level's width (1280)."""
        return 4 * self.channels[0]

    def __post_init__(self) -> None:
        if len(self.cross_attention) != len(self.channels):
            raise ValueError(
                f"UNetConfig.cross_attention has {len(self.cross_attention)} entries but channels has "
                f"{len(self.channels)} levels; give one flag per level"
            )
        for width in self.channels:
            if width % self.heads or width % self.norm_groups:
                raise ValueError(f"UNetConfig: level width {width} is not divisible by heads={self.heads} "
                                 f"and norm_groups={self.norm_groups}")


@dataclass(frozen=True)
class AutoencoderConfig:
    image_channels: int = 3  # RGB
    latent_channels: int = 4  # the posterior has twice as many moments (mean and log-variance)
    channels: tuple[int, ...] = (128, 256, 512, 512)  # width of each encoder level, finest first
    res_blocks: int = 2  # residual blocks per encoder level; each decoder level has one more
    norm_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-6  # GroupNorm epsilon everywhere
    scaling_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them

    def __post_init__(self) -> None:
        for width in self.channels:
            if width % self.norm_groups:
                raise ValueError(f"AutoencoderConfig: level width {width} is not divisible by norm_groups={self.norm_groups}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: one halving between consecutive levels (8 for the official VAE)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224  # input pixels per side
    patch_size: int = 14  # pixels per patch side: (224 / 14)^2 = 256 patches + 1 class token
    width: int = 1024  # token width
    layers: int = 24  # transformer layers
    heads: int = 16  # attention heads
    mlp_dim: int = 4096  # hidden width of each MLP (quick-GELU)
    norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        if self.width % self.heads or self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: width {self.width} must be divisible by heads={self.heads} and "
                             f"image_size {self.image_size} by patch_size={self.patch_size}")


def clip_vit_b32() -> CLIPVisionConfig:
    """CLIP ViT-B/32's vision tower: the network of the paper's COCOEE metrics (not of Paint by Example itself)."""
    return CLIPVisionConfig(patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072)


@dataclass(frozen=True)
class CLIPFeaturesConfig:
    """CLIP's image features: the tower's pooled token through the visual projection; ViT-B/32 by default."""

    clip: CLIPVisionConfig = field(default_factory=clip_vit_b32)
    projection_dim: int = 512  # width of CLIP's joint image-text space


@dataclass(frozen=True)
class ImageEncoderConfig:
    clip: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    mapper_layers: int = 5  # single-head transformer blocks applied to the pooled CLIP token
    embed_dim: int = 768  # width of the conditioning token the UNet cross-attends to


@dataclass(frozen=True)
class PaintByExampleConfig:
    """The three networks together: what a native pbe checkpoint stores in its metadata."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
