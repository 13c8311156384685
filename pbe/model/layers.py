"""Building blocks shared by the UNet, the autoencoder and the image encoder.

Attention and the pre-norm transformer layer: Vaswani et al., "Attention Is All You Need" (arXiv 1706.03762).
Residual blocks: He et al. (arXiv 1512.03385), in the GroupNorm-SiLU-conv form of Ho et al. (arXiv 2006.11239).
Group normalisation: Wu and He (arXiv 1803.08494).

Exact fast paths defined here, each in one place with its proof: ``norm_affine`` (float32 norm weights on the CPU),
``GroupNormSiLU`` (SiLU in place), ``add_into`` (residual adds into a fresh buffer), ``tokens_to_map`` (attention
outputs keep their input's memory layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def norm_affine(norm: nn.GroupNorm | nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias that ``norm`` hands its kernel for the activations ``x``.

    Exact fast path, on the CPU only: PyTorch's CPU GroupNorm/LayerNorm kernels compute the statistics and the affine
    in float32 whatever the weights' dtype and round once at the end, so float32 weights with bfloat16 activations
    give the very bits of bfloat16 weights (measured), without a float32 copy of the activations. Everywhere else
    each op sees one dtype, as in diffusers' networks: CUDA's kernels refuse mixed dtypes (pytorch/pytorch#135969).
    """
    if x.device.type == "cpu":
        return norm.weight.float(), norm.bias.float()
    return norm.weight, norm.bias


class GroupNorm(nn.GroupNorm):
    """GroupNorm over ``num_groups`` channel groups, returned in the activations' dtype.

    Calls the kernel itself, not ``F.group_norm``: that wrapper refuses a group holding a single value ("Expected more
    than 1 value per channel when training"), a guard for training statistics. At inference such a group is well
    defined (it normalises to 0, leaving the bias), and a batch-1 call on a 1x1 map meets it where diffusers, which
    runs the guided batch twice, does not: an 8x8 picture on networks with one channel per group.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, *norm_affine(self, x), self.eps, torch.backends.cudnn.enabled)


class GroupNormSiLU(GroupNorm):
    """silu(GroupNorm(x)).

    Exact fast path: SiLU runs in place on the norm's output, a fresh tensor nothing else holds (one full-size buffer
    fewer).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x), inplace=True)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension, returned in the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, *norm_affine(self, x), self.eps)


def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, stored in ``fresh``'s buffer.

    Exact fast path: the same sum, written over ``fresh``, a layer's output that nothing else holds: one full-size
    buffer fewer per residual add (0.4 GB of peak memory in a 512x512 autoencoder decode).
    """
    return fresh.add_(other)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps, cosines first: [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)).

    (B,) -> (B, dim), float32.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v; self-attention when no context is given."""

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
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def tokens_to_map(tokens: torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W), stored in the memory layout of ``like`` (the feature map the tokens came from).

    Exact fast path: a layout moves values, it changes none. Keeping the input's layout makes the residual add and the
    next convolution run the kernels they would run without the attention (diffusers' kernels for a contiguous
    input), and costs no copy for a channels-last one.
    """
    layout = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return rearrange(tokens, "b (h w) c -> b c h w", h=like.shape[2]).contiguous(memory_format=layout)


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
    """skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_proj(silu(time_emb))))).

    The UNet adds the projected timestep embedding (one value per channel) between the two convolutions; the
    autoencoder has none. The skip is a 1x1 convolution where the width changes.
    """

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
        h = self.conv1(self.norm1(x))
        if self.time_proj is not None:
            h = add_into(h, self.time_proj(F.silu(time_emb))[:, :, None, None])  # one value per channel
        h = self.conv2(self.norm2(h))
        return add_into(h, self.skip(x))


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
