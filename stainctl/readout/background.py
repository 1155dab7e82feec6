"""The colour of a slide's glass, the white that optical densities are relative to.

Scanners read empty glass differently (OS-2 Ki67: 229/227/238 on a Hamamatsu, 220/221/222 on an
Olympus); Beer-Lambert density is -log(I / I_glass), so densities are comparable between scanners
only relative to each one's glass. It is taken from the brightest pixels of a low-resolution view
of the slide (its thumbnail), per channel, so it is one value for all of a slide's tiles.
"""

from __future__ import annotations

import numpy as np

WHITE = (255, 255, 255)
BRIGHTEST = 0.02  # the brightest 2 % of pixels: glass on any slide with some background
MIN_GLASS = 180  # below this the brightest pixels are tissue, not glass: keep 255


def glass_white(rgb: np.ndarray) -> tuple[int, int, int]:
    """Per-channel median of the brightest 2 % of a uint8 RGB(A) image's pixels; (255, 255, 255)
    when those are too dark to be glass (a crop of solid tissue)."""
    from stainctl.slide.quantile import brightest_median

    if rgb[..., :3].size == 0:
        return WHITE
    white = brightest_median(rgb, 1.0 - BRIGHTEST)
    if white.min() < MIN_GLASS:
        return WHITE
    return (int(white[0]), int(white[1]), int(white[2]))
