"""Which pixels of a training or evaluation crop are tissue and which are glass.

Two thresholds on 0-255 RGB, used by the trainer's crop samplers, its held-out crops and its glass
loss (the slide-level tissue mask of tiling is `slide/tissue.py`, on a low-resolution thumbnail):
  * tissue: a pixel whose mean over the channels is below TISSUE_BELOW (darker than glass);
  * glass: bright (mean above GLASS_ABOVE) and unstained (channel spread below GLASS_SPREAD).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

TISSUE_BELOW = 220.0
GLASS_ABOVE = 229.5  # 0.8 in [-1, 1]
GLASS_SPREAD = 12.75  # 0.1 in [-1, 1]
MIN_TISSUE = 0.5  # a crop that teaches something is at least half tissue


def tissue_fraction(rgb: np.ndarray) -> float:
    """The fraction of a uint8 RGB(A) crop's pixels that are tissue."""
    return float((rgb[..., :3].mean(axis=2) < TISSUE_BELOW).mean())


def is_tissue_crop(rgb: np.ndarray, min_tissue: float = MIN_TISSUE) -> bool:
    return tissue_fraction(rgb) >= min_tissue


def glass_mask(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W) bool: glass pixels of uint8 RGB images (channels last)."""
    f = rgb[..., :3].astype(np.float32)
    return (f.mean(axis=-1) > GLASS_ABOVE) & (f.max(axis=-1) - f.min(axis=-1) < GLASS_SPREAD)


def glass_mask_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: glass pixels of (B, 3, H, W) images in [-1, 1]."""
    bright = GLASS_ABOVE / 127.5 - 1
    spread = GLASS_SPREAD / 127.5
    return ((x.mean(dim=1, keepdim=True) > bright)
            & ((x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) < spread))
