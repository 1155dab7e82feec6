"""The tile grid: square tiles defined at a target resolution, positioned in level-0 pixels.

Tiles cover the whole slide: the last column/row may extend past the edge (read as white glass)
so that no tissue at the border is lost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GridParams:
    target_mpp: float = 0.5
    tile_size: int = 512
    overlap: int = 0
    min_tissue: float = 0.25

    def __post_init__(self) -> None:
        from stainctl.errors import UsageError

        if not self.target_mpp > 0:
            raise UsageError(f"--target-mpp must be positive, got {self.target_mpp}")
        if self.tile_size < 16:
            raise UsageError(f"--tile-size must be at least 16, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise UsageError(f"--overlap must be in [0, tile size), got {self.overlap}")
        if not 0 <= self.min_tissue <= 1:
            raise UsageError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Grid:
    extent0: float  # tile side in level-0 pixels
    stride0: float  # distance between tile origins in level-0 pixels
    cols: int
    rows: int

    def origins(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of every tile, row-major, as integer arrays."""
        xs = np.round(np.arange(self.cols) * self.stride0).astype(np.int64)
        ys = np.round(np.arange(self.rows) * self.stride0).astype(np.int64)
        gx, gy = np.meshgrid(xs, ys)
        return gx.ravel(), gy.ravel()


def make_grid(width0: int, height0: int, slide_mpp: float, params: GridParams) -> Grid:
    scale = params.target_mpp / slide_mpp
    extent0 = params.tile_size * scale
    stride0 = (params.tile_size - params.overlap) * scale

    def count(length: int) -> int:
        return 1 + max(0, math.ceil((length - extent0) / stride0 - 1e-9))

    return Grid(extent0, stride0, count(width0), count(height0))


def tissue_fractions(mask: np.ndarray, width0: int, height0: int, grid: Grid,
                     offset: int = 0) -> np.ndarray:
    """Fraction of each tile's footprint covered by the mask (row-major, like `origins`), for
    the grid moved by `offset` level-0 pixels along both axes.

    The part of a tile outside the slide counts as background.
    """
    import cv2

    mh, mw = mask.shape
    sx, sy = mw / width0, mh / height0
    integral = cv2.integral(mask.astype(np.uint8))  # (mh + 1, mw + 1)
    xs, ys = grid.origins()
    xs, ys = xs + offset, ys + offset
    x0 = np.round(xs * sx).astype(np.int64)
    y0 = np.round(ys * sy).astype(np.int64)
    x1 = np.round((xs + grid.extent0) * sx).astype(np.int64)
    y1 = np.round((ys + grid.extent0) * sy).astype(np.int64)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    cx0, cx1 = np.clip(x0, 0, mw), np.clip(x1, 0, mw)
    cy0, cy1 = np.clip(y0, 0, mh), np.clip(y1, 0, mh)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return inside / area
