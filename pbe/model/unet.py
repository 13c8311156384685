"""The denoising UNet of Paint by Example: Stable Diffusion 1's latent UNet with a 9-channel input.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752), as used by
Yang et al., "Paint by Example" (arXiv 2211.13227): the input is the noisy latent, the masked image's latent and the
keep mask stacked along channels; the context is ONE token computed from the example image.

Data flow: conv_in -> down levels (res blocks, transformers, downsample) -> mid (res, transformer, res) -> up levels
(each res block eats one skip from the way down) -> GroupNorm-SiLU-conv_out.

Classifier-free guidance runs one sample against two contexts. Everything before the first cross-attention cannot
see the context, so the sample goes in once and is fanned out to the contexts' batch right there (``fan_out``); the
skips taken before that point are fanned out when the way up consumes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import Attention, Downsample, GroupNorm, GroupNormSiLU, LayerNorm, ResBlock, Upsample, timestep_embedding


def fan_out(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` repeated along dim 0 to ``batch`` rows as [x, x, ...] (the batch layout of classifier-free guidance)."""
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *[1] * (x.dim() - 1))


class GEGLU(nn.Module):
    """Feed-forward with a gated GELU (Shazeer, arXiv 2002.05202): out(a * gelu(b)), where [a, b] = proj(x)."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)
        self.out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # proj's two halves run as two products, so a and b each land contiguous and the elementwise work reads
        # memory in order (the same sums as slicing one product's output, and a quarter faster at 64x64).
        inner = self.out.in_features
        weight, bias = self.proj.weight, self.proj.bias
        a = F.linear(x, weight[:inner], bias[:inner])
        b = F.linear(x, weight[inner:], bias[inner:])
        return self.out(a * F.gelu(b))


class SpatialTransformer(nn.Module):
    """One transformer block over the pixels of a feature map: self-attention, cross-attention to the context, GEGLU."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.self_attn_norm = LayerNorm(channels)
        self.self_attn = Attention(channels, heads)
        self.cross_attn_norm = LayerNorm(channels)
        self.cross_attn = Attention(channels, heads, context_dim=context_dim)
        self.ff_norm = LayerNorm(channels)
        self.ff = GEGLU(channels, 4 * channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        # (B, C, H, W) -> (B, H*W, C), copied to a contiguous layout (the matrix products then run as diffusers')
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = tokens + self.self_attn(self.self_attn_norm(tokens))
        if context.shape[0] != b:
            # The sample is shared by several contexts (classifier-free guidance): everything so far was the same for
            # each of them, and this is where they part. Fan out as [tokens, tokens, ...], context's batch layout.
            tokens, x = fan_out(tokens, context.shape[0]), fan_out(x, context.shape[0])
        if context.shape[1] == 1:
            # Softmax over ONE key is exactly 1: every position receives that key's value, whatever its query.
            # Paint by Example's context is one token, so the queries, scores and the norm feeding them are skipped,
            # and the output projection runs once per image instead of once per position.
            tokens = tokens + self.cross_attn.to_out(self.cross_attn.to_v(context))
        else:
            tokens = tokens + self.cross_attn(self.cross_attn_norm(tokens), context)
        tokens = tokens + self.ff(self.ff_norm(tokens))
        # (B, H*W, C) -> (B, C, H, W), in the input's memory layout (free for a channels-last input)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        tokens = tokens.reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        return x + self.proj_out(tokens)


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

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """``sample`` [B, 9, h, w], ``timestep`` (one, or one per sample), ``context`` [B, S, 768] -> noise [B, 4, h, w].

        ``context`` may also hold k*B rows for k > 1 (classifier-free guidance: k = 2, unconditional rows first):
        row j*B + i is then conditioned on context row j*B + i with sample i, and the output has k*B rows. The layers
        before the first cross-attention, which the contexts cannot influence, run once per sample instead of k times.
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
                x = level.block(i, x, time_emb, context)
                skips.append(x)
            if level.resample is not None:
                x = level.resample(x)
                skips.append(x)

        x = self.mid_res1(x, fan_out(time_emb, x.shape[0]))
        x = self.mid_attn(x, context)  # from here on, every feature map has the context's batch
        time_emb = fan_out(time_emb, x.shape[0])
        x = self.mid_res2(x, time_emb)

        # Up: concatenate the matching skip before every res block; upsample to the size the way down had.
        for level in self.up:
            for i in range(len(level.res)):
                x = level.block(i, torch.cat([x, fan_out(skips.pop(), x.shape[0])], dim=1), time_emb, context)
            if level.resample is not None:
                x = level.resample(x, size=skips[-1].shape[-2:])

        return self.conv_out(self.norm_out(x))
