"""DAB optical density by colour deconvolution, in numpy (evaluation) and torch (training).

Both forms use one set of stain vectors, scikit-image's H-E-DAB matrix (`hed_from_rgb`, Ruifrok &
Johnston), and the formula of `skimage.color.rgb2hed`: optical density log(max(v, 1e-6)) /
log(1e-6) per channel, times the matrix, clipped at 0. The DAB density is a sum of one term per
channel, so the numpy form reads it from per-channel lookup tables (~10x faster than converting
the image to float64); the torch form computes it on float images and is differentiable.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

EPS = 1e-6  # skimage's floor on the normalised intensity before the log
HAEMATOXYLIN = 0  # the columns of the H-E-DAB matrix
DAB = 2


# `skimage.color.hed_from_rgb` (scipy.linalg.inv of its rgb_from_hed), to the last bit (a test
# compares them): importing skimage.color imports scipy.linalg, ~0.2 s of every readout's start.
_HED_FROM_RGB = ((1.8779827368521356, -1.0076786862855642, -0.5561158181996246),
                 (-0.06590806222356334, 1.1347303724996625, -0.13552179862837116),
                 (-0.6019073634392891, -0.4804141884970579, 1.5735880719641926))


@functools.cache
def hed_from_rgb() -> np.ndarray:
    """(3, 3) float64: RGB optical density -> haematoxylin, eosin, DAB."""
    return np.array(_HED_FROM_RGB, dtype=np.float64)


def dab_density(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 DAB optical density of a uint8 RGB image (`rgb2hed(rgb)[..., 2]`):
    `stain_density` with white = 255."""
    return stain_density(rgb, DAB)


@functools.cache
def od_table(white: tuple[int, int, int]) -> np.ndarray:
    """(256, 3) float64 optical density (rgb2hed's scale) of each intensity of each channel,
    relative to `white` and clipped at it: every stain density here is made from it."""
    v = np.arange(256, dtype=np.float64)[:, None] / np.asarray(white, dtype=np.float64)[None, :]
    return np.log(np.clip(v, EPS, 1.0)) / np.log(EPS)


@functools.cache
def _stain_luts(column: int, white: tuple[int, int, int]) -> np.ndarray:
    """(3, 256) lookup tables of one stain's density, intensities relative to `white`."""
    return (od_table(white).T * hed_from_rgb()[:, column][:, None]).astype(np.float32)


def stain_density(rgb: np.ndarray, column: int,
                  white: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """(H, W) float32 density of stain `column` (HAEMATOXYLIN or DAB) of a uint8 RGB image.

    `white` is the RGB of the slide's glass: Beer-Lambert density is relative to the light that
    reaches the sensor through glass, which differs between scanners (one reads glass as 229,
    another as 220). Intensities at or above it have zero density. With white = 255 the DAB
    density equals `dab_density` (and `rgb2hed`).
    """
    luts = _stain_luts(column, (int(white[0]), int(white[1]), int(white[2])))
    out = luts[0][rgb[..., 0]]
    out += luts[1][rgb[..., 1]]
    out += luts[2][rgb[..., 2]]
    return np.maximum(out, 0, out=out)


def dab_density_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) DAB optical density of (B, 3, H, W) images in [-1, 1] (differentiable)."""
    import torch

    column = torch.as_tensor(hed_from_rgb()[:, DAB], dtype=x.dtype, device=x.device)
    return torch.clamp(_od_torch(x) @ column, min=0)  # one column: a third of the product


def hed_density_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) haematoxylin, eosin and DAB optical densities of (B, 3, H, W) images in
    [-1, 1] (differentiable)."""
    import torch

    matrix = torch.as_tensor(hed_from_rgb(), dtype=x.dtype, device=x.device)
    return torch.clamp(_od_torch(x) @ matrix, min=0)


def _od_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) optical density, scaled as rgb2hed scales it, of (B, 3, H, W) in [-1, 1]."""
    import torch

    rgb = ((x + 1) / 2).clamp(EPS, 1).permute(0, 2, 3, 1)
    return torch.log(rgb) / math.log(EPS)


@functools.cache
def _hdab_projector() -> np.ndarray:
    """(3, 3) projector onto the plane of the haematoxylin and DAB optical density vectors
    (built once: it runs twice a training step)."""
    from skimage.color import rgb_from_hed

    basis = np.asarray(rgb_from_hed, dtype=np.float64)[[0, 2]].T
    return basis @ np.linalg.pinv(basis)


def off_stain_residual_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) length of the part of each pixel's optical density (the units above) that no
    mix of haematoxylin and DAB explains: near 0 for a brightfield H-DAB IHC, large for colours
    such a slide cannot have (green, or the pink of eosin) (differentiable)."""
    import torch

    projector = torch.as_tensor(_hdab_projector(), dtype=x.dtype, device=x.device)
    od = _od_torch(x)
    return (od - od @ projector.T).norm(dim=-1)
