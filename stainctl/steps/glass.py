"""The colour a model gives a slide's glass, to fill the tiles `translate` leaves out.

Glass tiles are not translated; `stitch` fills them with the store's background colour. A fixed
near-white differs from what the model makes of glass (seen: (240, 240, 238) against about
(245, 244, 244) from demo-ki67), and the difference draws the tile grid on every virtual slide.
So the colour is measured once per slide and model: a tile of the slide's own glass goes through
the engine and the median of its output (context margin left out) is the fill.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stainctl.slide.tiles import TileSource
from stainctl.workspace import Workspace

# When a slide has no glass at all to measure (tissue everywhere, or no thumbnail).
FALLBACK_GLASS = (240, 240, 238)


def glass_colour(ws: Workspace, slide: Any, grid: Any, engine: Any, source: TileSource,
                 margin: int, seed: int) -> tuple[int, int, int]:
    """The median RGB the engine gives a glass tile of `slide` (read like the tissue tiles:
    `source` gives tiles with `margin` px of context on each side)."""
    tile = glass_tile(ws, slide, grid, source, margin)
    out = engine.translate(tile[None], [seed])[0]
    side = out.shape[0]
    inner = out[margin:side - margin, margin:side - margin] if 2 * margin < side else out
    median = np.median(inner.reshape(-1, 3), axis=0)
    return _rgb(median)


def glass_tile(ws: Workspace, slide: Any, grid: Any, source: TileSource,
               margin: int) -> np.ndarray:
    """The slide tile, context included, with the least tissue among those the tissue mask left
    out that lie wholly inside the slide; failing one, a uniform tile of the glass colour the
    slide's thumbnail shows."""
    scale = float(grid["extent0"]) / float(grid["tile_size"])  # level-0 px per output px
    m0 = margin * scale
    reach = float(grid["extent0"]) + m0
    row = ws.manifest.db.execute(
        "SELECT x, y FROM tiles WHERE slide_id=? AND in_tissue=0 AND x>=? AND y>=? "
        "AND x+?<=? AND y+?<=? ORDER BY tissue, row, col LIMIT 1",
        (slide["id"], m0, m0, reach, slide["width"], reach, slide["height"])).fetchone()
    if row is not None:
        return source.read(round(row[0] - m0), round(row[1] - m0))
    colour = thumbnail_glass(ws, slide["key"])
    return np.full((source.tile_size, source.tile_size, 3), colour, np.uint8)


def thumbnail_glass(ws: Workspace, key: str) -> tuple[int, int, int]:
    """Median colour of the thumbnail outside the tissue mask (the brightest 5 % of it where the
    mask covers everything)."""
    import cv2

    folder = ws.slide_dir(key)
    thumb = cv2.imread(str(folder / "thumbnail.png"), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(folder / "tissue_mask.png"), cv2.IMREAD_GRAYSCALE)
    if thumb is None:
        return FALLBACK_GLASS
    rgb = thumb[..., ::-1].reshape(-1, 3)
    glass = rgb[(mask.reshape(-1) == 0)] if mask is not None and mask.shape == thumb.shape[:2] \
        else rgb[:0]
    if len(glass) < 100:
        brightness = rgb.astype(np.int32).sum(axis=1)
        glass = rgb[brightness >= np.percentile(brightness, 95)]
    median = np.median(glass, axis=0)
    return _rgb(median)


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(np.rint(v)) for v in values)
    return r, g, b
