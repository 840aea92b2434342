"""The denoising UNet: a bare ``nn.Module`` mapping (x_t, t) to predicted noise ε.

Topology of the diffusion UNet THOR uses (MONAI generative's ``DiffusionModelUNet`` layout): a
sinusoidal time embedding, per level ``num_res_blocks`` residual blocks (optionally followed by
self-attention) and a strided-conv downsample, a middle block (res, attention, res), and a mirrored
up path whose blocks concatenate the skip activations. With channels (128, 256, 256), attention
(F, T, T) and one res block per level it has about 18.5 M parameters.

Attention uses ``F.scaled_dot_product_attention``: at 64x64 tokens the naive form materialises a
4096x4096 map per head and, on CPU, gets slower per image as the batch grows (docs/thor.md, Model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meddiff.config.thor import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    # Output layers of residual branches start at zero so every block begins as the identity,
    # which keeps early training stable.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Spatial self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        q, k, v = (
            t.reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One res block, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: Attention | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class DiffusionUNet(nn.Module):
    """ε-prediction UNet. ``forward(x (B, C, H, W), t (B,) int) → ε̂ (B, C, H, W)``; a network
    moved to channels-last memory format converts its input to that format itself."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        g, hc, p = cfg.norm_groups, cfg.num_head_channels, cfg.dropout
        temb = 4 * ch[0]
        self.time_embed = nn.Sequential(nn.Linear(ch[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        def attn(c: int, on: bool) -> Attention | None:
            return Attention(c, hc, g) if on else None

        self.down = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for level, (c, on) in enumerate(zip(ch, cfg.attention_levels, strict=True)):
            for _ in range(cfg.num_res_blocks):
                self.down.append(_Stage(ResBlock(cur, c, temb, g, p), attn(c, on)))
                cur = c
                skips.append(cur)
            if level < len(ch) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)

        self.mid = nn.ModuleList(
            [
                _Stage(ResBlock(cur, cur, temb, g, p), attn(cur, cfg.attention_levels[-1])),
                _Stage(ResBlock(cur, cur, temb, g, p), None),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            c, on = ch[level], cfg.attention_levels[level]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(_Stage(ResBlock(cur + skips.pop(), c, temb, g, p), attn(c, on)))
                cur = c
            if level > 0:
                self.up.append(Upsample(cur))

        self.out = nn.Sequential(
            nn.GroupNorm(g, cur, eps=1e-6),
            nn.SiLU(),
            _zero(nn.Conv2d(cur, cfg.in_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels[0]).to(x.dtype))
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            # A channels-last network (CPU inference and training) takes its input in the same
            # layout: mkldnn convolutions are markedly faster when input and weights agree.
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Stage) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, _Stage):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
