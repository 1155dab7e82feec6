"""Embedding translation: a rectified-flow MLP that carries H&E tokens to IHC-style tokens.

The network predicts the velocity (IHC - H&E) at a point between the two, at a time scaled to
0..999; integrating it with Euler steps from the H&E tokens lands near the IHC tokens of the same
tissue. The result is rescaled to the mean token norm of the H&E input, so the transformer sees
tokens of the size it was trained on. Parameter names follow the released `*_mlp.pth` files
(residual MLP with a sinusoidal time embedding; 1536 -> 1024 width, 6 blocks: ~24 M parameters).
Its output layers start at zero, so an untrained flow is the identity map.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def time_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FlowBlock(nn.Module):
    def __init__(self, width: int, bottleneck: int, time_dim: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(width), nn.SiLU(),
                                       nn.Linear(width, bottleneck))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, bottleneck))
        self.out_layers = nn.Sequential(nn.LayerNorm(bottleneck), nn.SiLU(), nn.Dropout(0.0),
                                        _zero(nn.Linear(bottleneck, width)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x) + self.emb_layers(emb))


class FlowMLP(nn.Module):
    def __init__(self, channels: int = 1536, width: int = 1024, time_dim: int = 1024,
                 bottleneck: int = 1024, blocks: int = 6) -> None:
        super().__init__()
        self.width = width
        self.time_embed = nn.Sequential(nn.Linear(width, time_dim), nn.SiLU(),
                                        nn.Linear(time_dim, time_dim))
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(FlowBlock(width, bottleneck, time_dim)
                                        for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.SiLU(),
                                 _zero(nn.Linear(width, channels)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity at tokens x (N, channels) and times t (N,) in 0..999."""
        emb = self.time_embed(time_features(t, self.width))
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, emb)
        return self.out(h)


@torch.no_grad()
def translate_tokens(flow: Any, tokens: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """(B, T, C) H&E tokens -> IHC-style tokens: Euler steps from t=0 (H&E) to t=1, then each
    tile's tokens rescaled to the mean token norm of its input."""
    b, n, c = tokens.shape
    x = tokens.reshape(b * n, c).float()
    for i in range(steps):
        t = torch.full((b * n,), 999.0 * i / steps, device=x.device)
        x = x + flow(x, t).float() / steps
    x = x.reshape(b, n, c)
    target = tokens.float().norm(dim=-1).mean(dim=1, keepdim=True)
    current = x.norm(dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-12)
    return x * (target / current)[..., None]
