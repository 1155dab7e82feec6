"""Blending stored tiles into the output canvas, one band of rows at a time.

Neighbouring stored tiles share a band `blend` px wide (the grid overlap plus both context margins).
Across that band the left (upper) tile fades out and the right (lower) one fades in with
raised-cosine weights, cos^2 and sin^2, which sum to one, so the result is the normalised weighted
mean of the tiles. Because the weights are a product of an x and a y ramp, blending rows of tiles
first and then the rows against each other gives the same result as the 2-D weighted mean, while
touching each pixel a bounded number of times. A tile the store lacks (filtered out, background)
takes part as a tile of the background colour, so tissue fades softly into it.

Memory: two bands of (side x canvas width) pixels, whatever the slide height, plus those whose
rows the consumer still holds, and two decoded tiles (a band row is decoded tile by tile, not as
a whole row, which would hold a third band's worth).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import numpy as np

from stainctl import heap
from stainctl.workspace.tilestore import StoreLayout, TileStore

ROW_CHUNK = 1024  # columns per cv2.blendLinear call across rows: o x 1024 px stays in cache


def ramps(width: int) -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in) over `width` px: cos^2 and sin^2 at pixel centres; they sum to 1."""
    u = (np.arange(width, dtype=np.float64) + 0.5) / max(width, 1)
    fade_in = np.sin(0.5 * np.pi * u) ** 2
    return (1.0 - fade_in).astype(np.float32), fade_in.astype(np.float32)


class Canvas:
    """The blended canvas of a tile store, produced as row blocks from top to bottom."""

    def __init__(self, store: TileStore, background: tuple[int, int, int],
                 written: np.ndarray | None = None,
                 bands: Callable[[], np.ndarray] | None = None) -> None:
        """`bands`, if given, hands out the (side, width, 3) band buffers instead of
        `_free_band`: one is asked for per band row, and the previous one is still read then."""
        self.store = store
        self._next_band = bands or self._free_band
        self.layout: StoreLayout = store.layout
        self.background = np.asarray(background, np.uint8)
        self.written = store.written() if written is None else written
        lay = self.layout
        # Two decoded tiles: the current one and its right neighbour, alternating.
        self._tiles = np.empty((2, lay.side, lay.side, 3), np.uint8)
        self._bands: list[np.ndarray] = []
        out, fade_in = ramps(lay.blend)
        # cv2.blendLinear wants weight maps of the blended block's size. Rows are blended in
        # chunks of ROW_CHUNK columns: the maps stay in cache (full-width maps were 20 MB read
        # per band) and OpenCV runs each chunk on this thread instead of waking its thread pool
        # against the pyramid encoder.
        self._w_cols = (np.tile(out, (lay.side, 1)), np.tile(fade_in, (lay.side, 1)))
        chunk = min(ROW_CHUNK, lay.width)
        self._w_rows = (np.repeat(out[:, None], chunk, 1), np.repeat(fade_in[:, None], chunk, 1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.height, self.layout.width

    def blocks(self) -> Iterator[np.ndarray]:
        """C-contiguous (h, width, 3) uint8 blocks that tile the canvas rows in order."""
        lay = self.layout
        s, o, m = lay.side, lay.blend, lay.margin
        previous: np.ndarray | None = None
        for r in range(lay.rows):
            top = r * lay.stride - m  # canvas y of this band's first row
            if top >= lay.height:
                break
            band = self._band(r)
            if previous is not None and o:
                # The previous band's last rows are the same canvas rows as this band's first:
                # blended in place there (nothing was cut from them yet).
                tail = previous[s - o:]
                self._blend_rows(tail, band[:o])
                yield from _clip_rows(tail, top, lay.height)
            first = o if previous is not None else 0
            last = s - o if r < lay.rows - 1 else s
            yield from _clip_rows(band[first:last], top + first, lay.height)
            previous = band
            heap.trim()  # the encoder's freed buffers and the blends' temporaries go back

    def _band(self, r: int) -> np.ndarray:
        """Row r of tiles blended left to right: (side, width, 3), band row 0 at canvas y
        r * stride - margin."""
        import cv2

        lay = self.layout
        s, o, m, width = lay.side, lay.blend, lay.margin, lay.width
        present = self.written[r]
        band = self._next_band()
        if not present.any():
            band[:] = self.background
            return band
        tiles = self._tiles

        def read(c: int) -> np.ndarray | None:
            # Safe to reuse the slot: the band copies what it needs before c + 2 is read.
            return self.store.read_into(c, r, tiles[c % 2]) if present[c] else None

        tile = read(0)
        for c in range(lay.cols):
            left = c * lay.stride - m
            if left >= width:
                break
            first = o if c > 0 else 0
            last = s - o if c < lay.cols - 1 else s
            self._put(band, left + first, None if tile is None else tile[:, first:last],
                      last - first)
            right = read(c + 1) if c < lay.cols - 1 else None
            if c < lay.cols - 1 and o:
                x = left + s - o
                if tile is None and right is None:
                    self._put(band, x, None, o)
                else:
                    bg = np.broadcast_to(self.background, (s, o, 3))
                    a = bg if tile is None else tile[:, s - o:]
                    b = bg if right is None else right[:, :o]
                    if x >= 0 and x + o <= width:  # straight into the band, no temporary
                        cv2.blendLinear(a, b, *self._w_cols, dst=band[:, x:x + o])
                    else:
                        self._put(band, x, cv2.blendLinear(a, b, *self._w_cols), o)
            tile = right
        return band

    def _blend_rows(self, upper: np.ndarray, lower: np.ndarray) -> None:
        """`upper` (o, width, 3) fading out into `lower` fading in, written into `upper`."""
        import cv2

        w_out, w_in = self._w_rows
        chunk = w_out.shape[1]
        width = upper.shape[1]
        for x in range(0, width, chunk):
            n = min(chunk, width - x)
            part = upper[:, x:x + n]
            cv2.blendLinear(part, lower[:, x:x + n], w_out[:, :n], w_in[:, :n], dst=part)

    def _free_band(self) -> np.ndarray:
        """A band buffer that nothing else references any more (the blocks cut from it were
        consumed), else a new one. Reusing saves the page faults of a fresh ~70 MB array per
        band row (measured: ~0.5 s of CPU for a 40k x 30k canvas, 15 % of the blending), and
        holds no more memory than fresh arrays would at their peak."""
        bands = self._bands
        for i in range(len(bands)):
            if _references(bands, i) <= _UNSHARED:  # no view of it is alive anywhere
                return bands[i]
        lay = self.layout
        bands.append(np.empty((lay.side, lay.width, 3), np.uint8))
        return bands[-1]

    def _put(self, band: np.ndarray, x: int, block: np.ndarray | None, width: int) -> None:
        """Place `width` columns starting at canvas x, clipped to the canvas; None = background."""
        a, b = max(x, 0), min(x + width, band.shape[1])
        if a >= b:
            return
        if block is None:
            band[:, a:b] = self.background
        else:
            band[:, a:b] = block[:, a - x:b - x]


def _references(items: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(items[i])


# What `_references` counts for an array that only a list holds, measured rather than assumed
# (interpreters differ in the temporary references they count).
_UNSHARED = _references([np.empty(0)], 0)


def _clip_rows(block: np.ndarray, y: int, height: int) -> Iterator[np.ndarray]:
    a, b = max(y, 0), min(y + len(block), height)
    if a < b:
        yield np.ascontiguousarray(block[a - y:b - y])
