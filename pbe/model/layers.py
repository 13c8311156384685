"""Building blocks shared by the UNet, the autoencoder and the image encoder.

Normalisation in bfloat16/float16: the activations stay in their dtype (no float32 copy of a 128x512x512 map), but
the layer's weight and bias are passed in float32, which makes PyTorch's kernel compute the statistics AND the affine
transform in float32 and round once at the end. Everything else runs in the weights' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activations' dtype, returned in that dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.float(), self.bias.float(), self.eps)


class GroupNormSiLU(GroupNorm):
    """GroupNorm followed by SiLU (in place on the normalised copy: one fewer full-size buffer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x), inplace=True)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activations' dtype, returned in that dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps, cosines first: [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)).

    (B,) -> (B, dim), float32.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; self-attention when no context is given."""

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, N, heads * d) -> (B, heads, N, d)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N, d) -> (B, N, heads * d)
        return self.to_out(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """fc2(activation(fc1(x)))."""

    def __init__(self, width: int, hidden: int, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.activation = activation
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer with biases everywhere: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, width: int, *, heads: int, mlp_dim: int, activation: Callable[[torch.Tensor], torch.Tensor], eps: float
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with a skip; the UNet adds a projected timestep embedding in between."""

    def __init__(
        self, in_channels: int, out_channels: int, *, groups: int, eps: float, time_dim: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels) if time_dim else None
        self.norm2 = GroupNormSiLU(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        # The adds go in place into the convolutions' fresh outputs (the same sums; one full-size buffer fewer each,
        # which at 512x512 in the autoencoder is 0.4 GB of peak memory).
        h = self.conv1(self.norm1(x))
        if self.time_proj is not None:
            h += self.time_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(self.norm2(h))
        return h.add_(self.skip(x))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution. The autoencoder pads only bottom/right (asymmetric), the UNet pads 1 all round."""

    def __init__(self, channels: int, *, asymmetric_padding: bool = False) -> None:
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # An explicit size lets odd latent sizes (e.g. 9x7 -> 5x4 -> 3x2) find their way back up.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
