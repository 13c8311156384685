"""The denoising UNet of Paint by Example: Stable Diffusion 1's latent UNet with a 9-channel input.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752), as used by
Yang et al., "Paint by Example" (arXiv 2211.13227): the input is the noisy latent, the masked image's latent and the
keep mask stacked along channels; the context is ONE token computed from the example image.

Data flow: conv_in -> down levels (res blocks, transformers, downsample) -> mid (res, transformer, res) -> up levels
(each res block eats one skip from the way down) -> GroupNorm-SiLU-conv_out.

Exact fast paths defined here, each in one place with its proof: ``fan_out`` (classifier-free guidance shares the
layers before the first cross-attention), ``CrossAttention.one_token`` (softmax over one key is 1),
``GEGLU.halves`` (two products instead of one split); the transformer's output keeps its input's layout
(``layers.tokens_to_map``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig
from .layers import (Attention, Downsample, GroupNorm, GroupNormSiLU, LayerNorm, ResBlock, Upsample, timestep_embedding,
                     tokens_to_map)


def fan_out(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` repeated along dim 0 to ``batch`` rows as [x, x, ...] (the batch layout of classifier-free guidance).

    Exact fast path: a guided step runs ONE sample against k contexts ([uncond, cond]: k = 2), and nothing before the
    first cross-attention sees the context. So conv_in, the first res block and the first self-attention run once per
    sample instead of k times; the feature map is fanned out where the contexts part ways (the first cross-attention),
    and the time embedding and the skips taken before that point where they meet the fanned-out map.
    """
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *[1] * (x.dim() - 1))


class GEGLU(nn.Module):
    """Feed-forward with a gated GELU (Shazeer, arXiv 2002.05202): out(a * gelu(b)), where [a, b] = proj(x)."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)
        self.out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.halves(x)
        return self.out(a * F.gelu(b))

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``proj(x).chunk(2, dim=-1)``, as two products.

        Exact fast path: each output column of a linear layer is its own dot product, so the first and second halves
        of ``proj``'s rows give the first and second halves of its output, with the same sums. Each half then lands
        contiguous and the elementwise product reads memory in order (a quarter faster at 64x64).
        """
        inner = self.out.in_features
        weight, bias = self.proj.weight, self.proj.bias
        return F.linear(x, weight[:inner], bias[:inner]), F.linear(x, weight[inner:], bias[inner:])


class CrossAttention(Attention):
    """Attention of the image tokens (queries) to the context tokens (keys and values)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, norm: nn.Module) -> torch.Tensor:
        """``attention(norm(x), context)``; the norm is applied here so that the one-token fast path can skip it."""
        if context.shape[1] == 1:
            return self.one_token(context)
        return super().forward(norm(x), context)

    def one_token(self, context: torch.Tensor) -> torch.Tensor:
        """Attention to a context of ONE token, Paint by Example's case: ``to_out(to_v(context))``, [B, 1, C].

        Exact fast path: softmax over one key is exactly 1, so every query receives that key's value whatever it is.
        The norm, the queries, keys and scores are skipped, and ``to_out`` runs once per image instead of once per
        position (the residual add broadcasts the one row over the H*W positions).
        """
        return self.to_out(self.to_v(context))


class SpatialTransformer(nn.Module):
    """One transformer block over the pixels of a feature map: self-attention, cross-attention to the context, GEGLU."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.self_attn_norm = LayerNorm(channels)
        self.self_attn = Attention(channels, heads)
        self.cross_attn_norm = LayerNorm(channels)
        self.cross_attn = CrossAttention(channels, heads, context_dim=context_dim)
        self.ff_norm = LayerNorm(channels)
        self.ff = GEGLU(channels, 4 * channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        tokens = tokens + self.self_attn(self.self_attn_norm(tokens))
        tokens, x = fan_out(tokens, len(context)), fan_out(x, len(context))  # guidance: the contexts part ways here
        tokens = tokens + self.cross_attn(tokens, context, norm=self.cross_attn_norm)
        tokens = tokens + self.ff(self.ff_norm(tokens))
        return x + self.proj_out(tokens_to_map(tokens, like=x))


class Level(nn.Module):
    """One resolution level: res blocks, each optionally followed by a transformer, then a resample (or none)."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        *,
        config: UNetConfig,
        attention: bool,
        resample: nn.Module | None,
    ) -> None:
        super().__init__()
        res_kwargs = dict(groups=config.norm_groups, eps=config.norm_eps, time_dim=config.time_embed_dim)
        self.res = nn.ModuleList(ResBlock(c, out_channels, **res_kwargs) for c in in_channels)
        attn_kwargs = dict(heads=config.heads, context_dim=config.context_dim, groups=config.norm_groups)
        self.attn = nn.ModuleList(SpatialTransformer(out_channels, **attn_kwargs) for _ in in_channels) if attention else None
        self.resample = resample

    def block(self, i: int, x: torch.Tensor, time_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Res block ``i``, then its transformer if the level has them (the time embedding meets ``x``'s batch: see
        ``fan_out``)."""
        x = self.res[i](x, fan_out(time_emb, x.shape[0]))
        return self.attn[i](x, context) if self.attn is not None else x


class UNet(nn.Module):
    """Predicts the noise in a latent: ``unet(sample [B, 9, h, w], timestep, context [B, S, 768]) -> [B, 4, h, w]``."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        widths, n_res = config.channels, config.res_blocks
        last = len(widths) - 1
        self.time_embed = nn.Sequential(
            nn.Linear(widths[0], config.time_embed_dim), nn.SiLU(), nn.Linear(config.time_embed_dim, config.time_embed_dim)
        )
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)

        # The way down records the width of every feature map it hands over as a skip connection.
        skip_widths = [widths[0]]
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            in_widths = [widths[max(i - 1, 0)]] + [width] * (n_res - 1)
            downsample = Downsample(width) if i < last else None
            self.down.append(Level(in_widths, width, config=config, attention=config.cross_attention[i], resample=downsample))
            skip_widths += [width] * n_res + ([width] if downsample else [])

        res_kwargs = dict(groups=config.norm_groups, eps=config.norm_eps, time_dim=config.time_embed_dim)
        self.mid_res1 = ResBlock(widths[-1], widths[-1], **res_kwargs)
        self.mid_attn = SpatialTransformer(
            widths[-1], heads=config.heads, context_dim=config.context_dim, groups=config.norm_groups
        )
        self.mid_res2 = ResBlock(widths[-1], widths[-1], **res_kwargs)

        # The way up mirrors the way down, deepest level first; each res block concatenates one skip.
        self.up = nn.ModuleList()
        prev_width = widths[-1]
        for i, width in reversed(list(enumerate(widths))):
            in_widths = []
            for _ in range(n_res + 1):
                in_widths.append(prev_width + skip_widths.pop())
                prev_width = width
            upsample = Upsample(width) if i > 0 else None
            self.up.append(Level(in_widths, width, config=config, attention=config.cross_attention[i], resample=upsample))

        self.norm_out = GroupNormSiLU(config.norm_groups, widths[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)
        # Training only: keep each block's input instead of its activations and recompute them in backward (the
        # original trains with use_checkpoint: True). The same operations run, so results and gradients are unchanged.
        self.gradient_checkpointing = False

    def _block(self, block: Callable[..., torch.Tensor], *args: torch.Tensor | int) -> torch.Tensor:
        """``block(*args)``, under activation checkpointing when it is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """``sample`` [B, 9, h, w], ``timestep`` (one, or one per sample), ``context`` [B, S, 768] -> noise [B, 4, h, w].

        ``context`` may also hold k*B rows for k > 1 (classifier-free guidance: k = 2, unconditional rows first):
        row j*B + i is then conditioned on context row j*B + i with sample i, and the output has k*B rows. The layers
        before the first cross-attention, which the contexts cannot influence, run once per sample instead of k times
        (see ``fan_out``).
        """
        batch = sample.shape[0]
        if context.dim() != 3 or context.shape[0] % batch:
            raise ValueError(
                f"context: expected shape [k * {batch}, tokens, {self.config.context_dim}] for a sample batch of "
                f"{batch}, got {list(context.shape)}"
            )
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        time_emb = self.time_embed(timestep_embedding(timesteps, self.config.channels[0]).to(sample.dtype))

        # Down: keep every intermediate feature map for the skip connections.
        x = self.conv_in(sample)
        skips = [x]
        for level in self.down:
            for i in range(len(level.res)):
                x = self._block(level.block, i, x, time_emb, context)
                skips.append(x)
            if level.resample is not None:
                x = level.resample(x)
                skips.append(x)

        # Middle: res block, transformer, res block at the coarsest level.
        x = self._block(self.mid_res1, x, fan_out(time_emb, x.shape[0]))
        x = self._block(self.mid_attn, x, context)  # from here on, every feature map has the context's batch
        time_emb = fan_out(time_emb, x.shape[0])
        x = self._block(self.mid_res2, x, time_emb)

        # Up: concatenate the matching skip before every res block (skips from before the first cross-attention are
        # fanned out to x's batch); upsample to the size the way down had.
        for level in self.up:
            for i in range(len(level.res)):
                skip = fan_out(skips.pop(), x.shape[0])
                x = self._block(level.block, i, torch.cat([x, skip], dim=1), time_emb, context)
            if level.resample is not None:
                x = level.resample(x, size=skips[-1].shape[-2:])

        return self.conv_out(self.norm_out(x))
