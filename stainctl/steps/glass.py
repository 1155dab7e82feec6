"""The colour a model gives a slide's glass, to fill the tiles `translate` leaves out.

Glass tiles are not translated; `stitch` fills them with the store's background colour. A fixed
near-white differs from what the model makes of glass (seen: (240, 240, 238) against about
(245, 244, 244) from demo-ki67), and the difference draws the tile grid on every virtual slide.
So the colour is measured once per slide and model: a tile of the slide's own glass goes through
the engine and the median of its output (context margin left out) is the fill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.slide.tiles import TileSource
from stainctl.workspace import GridRecord, SlideRecord, Workspace

if TYPE_CHECKING:
    from stainctl.engines.base import Engine

# When a slide has no glass at all to measure (tissue everywhere, or no thumbnail).
FALLBACK_GLASS = (240, 240, 238)


def glass_colour(ws: Workspace, slide: SlideRecord, grid: GridRecord, engine: Engine,
                 source: TileSource, margin: int, seed: int) -> tuple[int, int, int]:
    """The median RGB the engine gives a glass tile of `slide` (read like the tissue tiles:
    `source` gives tiles with `margin` px of context on each side)."""
    return glass_median(engine, glass_tile(ws, slide, grid, source, margin), seed, margin)


def glass_median(engine: Engine, tile: NDArray[np.uint8], seed: int,
                 margin: int) -> tuple[int, int, int]:
    """The median RGB `engine` gives `tile`, its context margin left out."""
    out = engine.translate(tile[None], [seed])[0]
    side = out.shape[0]
    inner = out[margin:side - margin, margin:side - margin] if 2 * margin < side else out
    return _rgb(np.median(inner.reshape(-1, 3), axis=0))


def glass_spot(ws: Workspace, slide: SlideRecord, grid: GridRecord,
               margin: int) -> tuple[tuple[int, int] | None, tuple[int, int, int]]:
    """Where the glass tile is read (level-0 top-left, context included): the tile with the
    least tissue among those the tissue mask left out that lie wholly inside the slide; or None
    and the uniform glass colour the slide's thumbnail shows. Reads no slide pixels, so a worker
    can read the tile."""
    scale = grid.extent0 / grid.tile_size  # level-0 px per output px
    m0 = margin * scale
    reach = grid.extent0 + m0
    tile = None
    if slide.width is not None and slide.height is not None:
        tile = ws.manifest.glass_tile(slide.id, margin0=m0, reach=reach, width=slide.width,
                                      height=slide.height)
    if tile is not None:
        return (round(tile.x - m0), round(tile.y - m0)), FALLBACK_GLASS
    return None, thumbnail_glass(ws, slide.key)


def glass_tile(ws: Workspace, slide: SlideRecord, grid: GridRecord, source: TileSource,
               margin: int) -> NDArray[np.uint8]:
    """The glass tile `glass_spot` names, read; or a uniform tile of the thumbnail's glass."""
    at, colour = glass_spot(ws, slide, grid, margin)
    if at is not None:
        return source.read(*at)
    return np.full((source.tile_size, source.tile_size, 3), colour, np.uint8)


def thumbnail_glass(ws: Workspace, key: str) -> tuple[int, int, int]:
    """Median colour of the thumbnail outside the tissue mask (where the mask covers nearly
    everything: the slide layer's background colour, the brightest part of the thumbnail)."""
    import cv2

    from stainctl.slide.tissue import background_colour

    thumb = cv2.imread(str(ws.thumbnail_path(key)), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(ws.tissue_mask_path(key)), cv2.IMREAD_GRAYSCALE)
    if thumb is None:
        return FALLBACK_GLASS
    rgb = thumb[..., ::-1].reshape(-1, 3)
    glass = rgb[(mask.reshape(-1) == 0)] if mask is not None and mask.shape == thumb.shape[:2] \
        else rgb[:0]
    if len(glass) < 100:
        return _rgb(background_colour(rgb))
    return _rgb(np.median(glass, axis=0))


def _rgb(values: NDArray[np.float64]) -> tuple[int, int, int]:
    r, g, b = (int(np.rint(v)) for v in values)
    return r, g, b
