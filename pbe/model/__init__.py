"""The three networks of Paint by Example, in plain PyTorch. Imports torch and einops only."""

from .autoencoder import AutoencoderKL, DiagonalGaussian
from .clip import CLIPImageFeatures
from .config import (AutoencoderConfig, CLIPFeaturesConfig, CLIPVisionConfig, ImageEncoderConfig, PaintByExampleConfig,
                     UNetConfig)
from .image_encoder import ImageEncoder
from .unet import UNet

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "CLIPFeaturesConfig",
    "CLIPImageFeatures",
    "CLIPVisionConfig",
    "DiagonalGaussian",
    "ImageEncoder",
    "ImageEncoderConfig",
    "PaintByExampleConfig",
    "UNet",
    "UNetConfig",
]
