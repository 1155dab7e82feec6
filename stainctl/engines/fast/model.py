"""The `fast` generator: a compact U-Net whose decoder is modulated per marker (FiLM).

In the spirit of UNIStainNet: spatial conditioning comes from the network's own encoder; the
marker is a learned embedding that scales and shifts every decoder block, so one model holds
several markers; foundation-model tokens, when given, modulate the bottleneck per position
(SPADE-style). Sized for a 2-core CPU: the stem folds 2 x 2 pixels into channels, so the first
level already works at half resolution, and the output is unfolded back.

No normalisation layers: per-tile statistics (instance or group norm) would make neighbouring
tiles of a slide come out in different tones, which stitching can hide but not undo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class FastConfig:
    markers: tuple[str, ...] = ("ki67",)
    widths: tuple[int, ...] = (24, 48, 96, 192)  # channels per level (level 0 at half res.)
    marker_dim: int = 64
    token_dim: int = 0  # > 0: accept (B, tokens, token_dim) foundation-model tokens
    blocks: int = 2  # residual blocks at the bottleneck

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.SiLU())


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(ch, ch, 3, 1, 1)
        self.b = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.silu(self.a(x)))


class _FiLMUp(nn.Module):
    """Upsample, join the skip connection, convolve, then scale/shift by the marker."""

    def __init__(self, cin: int, cskip: int, cout: int, marker_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin + cskip, cout, 3, 1, 1)
        self.film = nn.Linear(marker_dim, 2 * cout)
        nn.init.zeros_(self.film.weight)  # start as the identity modulation
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.conv(torch.cat([x, skip], 1))
        gamma, beta = self.film(marker).chunk(2, dim=1)
        return F.silu(x * (1 + gamma[..., None, None]) + beta[..., None, None])


class _SPADE(nn.Module):
    """Per-position scale/shift of the bottleneck from a square grid of tokens."""

    def __init__(self, token_dim: int, ch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(token_dim, ch, 1)
        self.out = nn.Conv2d(ch, 2 * ch, 3, 1, 1, bias=False)
        nn.init.zeros_(self.out.weight)  # start as the identity modulation

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, t, d = tokens.shape
        g = math.isqrt(t)
        if g * g != t:
            raise ValueError(f"tokens must form a square grid, got {t}")
        grid = tokens.transpose(1, 2).reshape(b, d, g, g)
        grid = F.interpolate(F.silu(self.proj(grid)), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)
        gamma, beta = self.out(grid).chunk(2, dim=1)
        return x * (1 + gamma) + beta


class FastGenerator(nn.Module):
    def __init__(self, config: FastConfig | None = None) -> None:
        super().__init__()
        config = config or FastConfig()
        self.config = config
        w = config.widths
        self.stem = _conv(12, w[0])  # 2 x 2 pixels folded into channels
        self.downs = nn.ModuleList(_conv(w[i], w[i + 1], stride=2) for i in range(len(w) - 1))
        self.mid = nn.Sequential(*(_Residual(w[-1]) for _ in range(config.blocks)))
        self.spade = _SPADE(config.token_dim, w[-1]) if config.token_dim else None
        self.markers = nn.Embedding(len(config.markers), config.marker_dim)
        self.ups = nn.ModuleList(
            _FiLMUp(w[i + 1], w[i], w[i], config.marker_dim) for i in reversed(range(len(w) - 1)))
        self.head = nn.Conv2d(w[0], 12, 3, 1, 1)  # unfolded back to 3 x (2 x 2)

    def marker_index(self, marker: str) -> int:
        try:
            return self.config.markers.index(marker)
        except ValueError:
            raise KeyError(f"this model has no marker {marker!r}; it has "
                           f"{', '.join(self.config.markers)}") from None

    def forward(self, x: torch.Tensor, marker: torch.Tensor,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of 2 ** len(widths); marker: (B,) long;
        tokens: (B, T, token_dim) with T a square number, or None. Returns (B, 3, H, W) in
        [-1, 1]."""
        h = self.stem(F.pixel_unshuffle(x, 2))
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.mid(h)
        if self.spade is not None and tokens is not None:
            h = self.spade(h, tokens)
        m = self.markers(marker)
        for up, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
            h = up(h, skip, m)
        # Predict the change from the input (stain moves colour, keeps structure).
        return torch.tanh(F.pixel_shuffle(self.head(h), 2) + x)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(markers: Sequence[str], **kwargs: object) -> FastGenerator:
    return FastGenerator(FastConfig(markers=tuple(markers), **kwargs))  # type: ignore[arg-type]
