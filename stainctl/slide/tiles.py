"""Reading grid tiles at the target resolution, from any process (Dask workers included)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from stainctl.slide.reader import Slide, open_slide


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
    """(B, size, size, 3) batches of the tiles at level-0 `coords` (N, 2), in order, read by
    `readers` threads up to `readers + 1` batches ahead of the consumer (a model, on the
    previous batch)."""

    def read(i: int) -> np.ndarray:
        return np.stack([source.read(int(x), int(y)) for x, y in coords[i:i + batch_size]])

    starts = iter(range(0, len(coords), batch_size))
    with ThreadPoolExecutor(readers) as pool:
        pending: list[Future[np.ndarray]] = [
            pool.submit(read, i) for _, i in zip(range(readers + 1), starts, strict=False)]
        while pending:
            batch = pending.pop(0).result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            yield batch
