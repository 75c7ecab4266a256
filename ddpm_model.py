"""The U-Net every model here trains: the DDPM network (Ho et al. 2020) for small images.

It maps a noisy image and its time input (and, in conditional_ddpm.py, a class) to an image of the same shape.
What the input and output mean -- which noise level, which target -- is the business of the formulation
around it (diffusion.py), so the same network serves DDPM, EDM and flow matching.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import flag

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net's shape. The defaults are the documented 35.7M network."""
    model_channels: int = flag(128, "width of the first level")
    channel_mult: tuple[int, ...] = flag((1, 2, 2, 2), "channel multiplier per resolution, comma-separated")
    num_res_blocks: int = flag(2, "residual blocks per level")
    attention_resolutions: tuple[int, ...] = flag((14,), "feature-map sizes with self-attention; '' for none")
    dropout: float = flag(0.1, "dropout in every residual block")
    activation: str = flag("relu", "the nonlinearity", choices=tuple(ACTIVATIONS))
    image_size: int = flag(28, "the input size; on the command line its default is the data's own (28 for the MNIST "
                               "family, 32 for CIFAR-10): digits are padded to a larger one, other images resized "
                               "and centre-cropped")
    in_channels: int = 1  # the data's: one for grey images, three for colour


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Transformers and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups (DDPM's), but never fewer than 4 channels a group: with one channel a group the norm becomes
    an instance norm and erases each map's mean, which small models need (background level)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the (time [+ class]) embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, act: type):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch), act(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_proj = nn.Sequential(act(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(group_norm(out_ch), act(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_proj(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks (each optionally followed by attention) and a resampler."""

    def __init__(self, blocks: Sequence[nn.Module], attns: Sequence[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class Upsample(nn.Module):
    """Nearest upsampling to an explicit size, then a 3x3 conv: 4 -> 7 -> 14 -> 28 lands on each skip exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net for small images, of the shape `config` gives.

    Runs natively at any size, odd sizes included: downsampling is a stride-2 conv (28 -> 14 -> 7 -> 4)
    and upsampling returns to the size of the matching skip connection.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {config.activation!r}")
        self.config = config
        act = ACTIVATIONS[config.activation]
        model_channels, channel_mult, image_size = config.model_channels, config.channel_mult, config.image_size
        num_res_blocks, dropout, attention_resolutions = config.num_res_blocks, config.dropout, config.attention_resolutions
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), act(), nn.Linear(emb_dim, emb_dim))

        def attention(ch: int, res: int) -> nn.Module:
            return SelfAttention(ch) if res in attention_resolutions else nn.Identity()

        self.input_conv = nn.Conv2d(config.in_channels, model_channels, 3, padding=1)
        ch, res = model_channels, image_size
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, mult * model_channels, emb_dim, dropout, act))
                ch = mult * model_channels
                attns.append(attention(ch, res))
                skip_channels.append(ch)
            last = level == len(channel_mult) - 1
            self.down.append(Level(blocks, attns, None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
            if not last:
                skip_channels.append(ch)
                res = (res + 1) // 2

        self.mid_blocks = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, act) for _ in range(2)])
        self.mid_attn = SelfAttention(ch)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_channels.pop(), mult * model_channels, emb_dim, dropout, act))
                ch = mult * model_channels
                attns.append(attention(ch, res))
            if level > 0:
                res = image_size
                for _ in range(level - 1):  # the resolution of the level above
                    res = (res + 1) // 2
            self.up.append(Level(blocks, attns, Upsample(ch) if level > 0 else None))

        self.out = nn.Sequential(group_norm(ch), act(), nn.Conv2d(ch, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(x, self.time_embedding(t))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(timestep_embedding(t, self.model_channels))

    def forward_with_embedding(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network proper; `emb` is the embedding every residual block sees (time, and class if any)."""
        h = self.input_conv(x)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_blocks[1](self.mid_attn(self.mid_blocks[0](h, emb)), emb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])
        return self.out(h)
