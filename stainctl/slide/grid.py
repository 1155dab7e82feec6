"""The tile grid: square tiles defined at a target resolution, positioned in level-0 pixels.

Tiles cover the whole slide: the last column/row may extend past the edge (read as white glass)
so that no tissue at the border is lost.

When the target resolution is within `SNAP_TOLERANCE` of a pyramid level's own, the grid is laid
on that level's pixels: tile side and stride are whole level pixels and origins fall on them, so
tiles are read without resampling and, when the tile side is a multiple of the stored tiles'
(or the stored tiles' of it), coincide with stored tiles; the grid then records the level's
µm/px, which the tiles really have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# How far (relative) a target µm/px may be from a level's for tiles to be read from that level
# as they are stored: the margin `Slide.best_level` allows when it picks a level.
SNAP_TOLERANCE = 0.01
# Tiles enlarged more than this from the slide's finest pixels carry no detail the model expects
# (a 5 µm/px image tiled at 0.5 µm/px: each slide pixel becomes 10 x 10): said, not refused.
ENLARGE_LIMIT = 2.0


def enlargement_warning(slide_mpp: float, target_mpp: float) -> str | None:
    """A warning when the grid's pixels are much finer than the slide's level 0, else None."""
    factor = slide_mpp / target_mpp
    if factor <= ENLARGE_LIMIT:
        return None
    return (f"the slide has {slide_mpp:.3g} µm/px and its tiles are made at {target_mpp:.3g} "
            f"µm/px, each enlarged {factor:.1f}x: they lack the detail a model at that "
            "resolution expects, so a virtual stain of them will be blurred and may show no "
            "stain; check the slide's pixel size (--mpp, a CSV's mpp column) or use a scan at "
            f"{target_mpp:.3g} µm/px or finer")


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
    mpp: float = 0.0  # µm per tile pixel (the target, or the level's when snapped to it)
    level: int | None = None  # the pyramid level whose pixels the grid is laid on, if any

    def origins(self) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of every tile, row-major, as integer arrays."""
        xs = np.round(np.arange(self.cols) * self.stride0).astype(np.int64)
        ys = np.round(np.arange(self.rows) * self.stride0).astype(np.int64)
        gx, gy = np.meshgrid(xs, ys)
        return gx.ravel(), gy.ravel()


def make_grid(width0: int, height0: int, slide_mpp: float, params: GridParams,
              level_downsamples: Sequence[float] = ()) -> Grid:
    """The grid for a slide of `width0` x `height0` level-0 pixels; with the slide's
    `level_downsamples`, laid on a level's pixels when the target is that level's µm/px
    (within SNAP_TOLERANCE)."""
    scale, level = snapped_scale(params.target_mpp / slide_mpp, level_downsamples)
    extent0 = params.tile_size * scale
    stride0 = (params.tile_size - params.overlap) * scale

    def count(length: int) -> int:
        return 1 + max(0, math.ceil((length - extent0) / stride0 - 1e-9))

    mpp = params.target_mpp if level is None else slide_mpp * scale
    return Grid(extent0, stride0, count(width0), count(height0), mpp, level)


def snapped_scale(scale: float, level_downsamples: Sequence[float]
                  ) -> tuple[float, int | None]:
    """Level-0 px per output px as the grid reads them, and the level read as stored: a level's
    own downsample where `scale` is within SNAP_TOLERANCE of it (its pixels are not resampled),
    else `scale` itself and None."""
    level = snap_level(scale, level_downsamples)
    return (scale, None) if level is None else (float(level_downsamples[level]), level)


def snap_level(scale: float, level_downsamples: Sequence[float]) -> int | None:
    """The level whose downsample is within SNAP_TOLERANCE of `scale` (the nearest), or None."""
    best = None
    for i, ds in enumerate(level_downsamples):
        err = abs(scale / ds - 1)
        if err <= SNAP_TOLERANCE and (best is None or err < best[0]):
            best = (err, i)
    return None if best is None else best[1]


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
