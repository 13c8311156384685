"""The three networks of Paint by Example, in plain PyTorch. Imports torch and einops only."""

from .autoencoder import AutoencoderKL, DiagonalGaussian
from .config import AutoencoderConfig, CLIPVisionConfig, ImageEncoderConfig, PaintByExampleConfig, UNetConfig
from .image_encoder import ImageEncoder
from .unet import UNet

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "CLIPVisionConfig",
    "DiagonalGaussian",
    "ImageEncoder",
    "ImageEncoderConfig",
    "PaintByExampleConfig",
    "UNet",
    "UNetConfig",
]
