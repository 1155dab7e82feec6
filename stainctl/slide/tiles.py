"""Reading grid tiles at the target resolution, from any process (Dask workers included)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from stainctl.slide.reader import Slide, open_slide

# Batches read ahead of the consumer: one to overlap with it, one to absorb uneven reads.
AHEAD = 2


@dataclass(frozen=True)
class TileSource:
    """Everything a worker needs to read tiles of one slide: picklable, no open handles."""

    path: str
    extent0: float  # tile side in level-0 pixels
    tile_size: int  # tile side at the target resolution

    def read(self, x: int, y: int) -> np.ndarray:
        return read_tile(cached_slide(self.path), x, y, self.extent0, self.tile_size)


@functools.lru_cache(maxsize=8)
def cached_slide(path: str) -> Slide:
    """One open handle per slide per process; OpenSlide and tiffslide handles are thread-safe."""
    return open_slide(path)


def read_tile(slide: Slide, x: int, y: int, extent0: float, size: int) -> np.ndarray:
    """RGB (size, size, 3) covering [x, x + extent0) x [y, y + extent0) in level-0 pixels,
    read from the best pyramid level and resized."""
    import cv2

    level = slide.best_level(extent0 / size)
    ds = slide.level_downsamples[level]
    n = math.ceil(extent0 / ds - 1e-6)
    region = slide.read_region(x, y, level, n, n)
    if n == size:
        return region
    interp = cv2.INTER_AREA if n > size else cv2.INTER_LINEAR
    return cv2.resize(region, (size, size), interpolation=interp)


def read_batches(source: TileSource, coords: np.ndarray, batch_size: int,
                 readers: int) -> Iterator[np.ndarray]:
    """(B, size, size, 3) batches of the tiles at level-0 `coords` (N, 2), in order. `readers`
    threads share each batch (each reads a run of its tiles into it) and work up to `AHEAD`
    batches ahead of the consumer (a model, on the previous batch): memory holds AHEAD + 1
    batches whatever the readers, where a thread per batch held readers + 2 (640 tiles, ~0.6
    GB, at a GPU's 64-tile batches and 8 readers)."""
    side = source.tile_size
    part = max(1, -(-batch_size // readers))

    def fill(out: np.ndarray, start: int, lo: int, hi: int) -> None:
        for k in range(lo, hi):
            x, y = coords[start + k]
            out[k] = source.read(int(x), int(y))

    starts = iter(range(0, len(coords), batch_size))
    with ThreadPoolExecutor(readers) as pool:

        def submit(start: int) -> tuple[np.ndarray, list[Future[None]]]:
            out = np.empty((min(batch_size, len(coords) - start), side, side, 3), np.uint8)
            return out, [pool.submit(fill, out, start, lo, min(lo + part, len(out)))
                         for lo in range(0, len(out), part)]

        pending = [submit(i) for _, i in zip(range(AHEAD), starts, strict=False)]
        while pending:
            batch, parts = pending.pop(0)
            for f in parts:
                f.result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(submit(nxt))
            yield batch
