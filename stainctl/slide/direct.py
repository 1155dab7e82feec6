"""Read TIFF-based slides straight from their stored tiles, without OpenSlide.

For a pyramid level that is a tiled (or, for NDPI, restart-interval-tiled) 8-bit RGB/YCbCr/grey
TIFF page with JPEG (own or shared tables, YCbCr or RGB), Aperio JPEG 2000 (33003 YCbCr,
33005 RGB), LZW, deflate or no compression, a region is read as: the tiles it touches, their bytes
fetched with `os.pread` at the offsets in the page's tags, decoded by tifffile's decoder for that
page (imagecodecs, which releases the GIL, so reader threads decode in parallel) and pasted
together. OpenSlide spends ~5 ms more per 512-px tile on the same decode (docs/NOTES.md, issue 21).

Levels this cannot serve (other compressions, alpha, 16-bit, sparse layouts, vendors whose tiles
overlap or are offset such as MRXS, SCN, BIF, Philips) are left to OpenSlide/tiffslide: a
`DirectReader` only lists the levels it serves, and `Slide.read_region` asks it first.
Decoded tiles are kept in a small LRU cache shared by all slides of the process, so regions that
straddle stored tiles (grid tiles with context, SVS 240-px tiles, NDPI strips) decode each stored
tile once. `STAINCTL_DIRECT_READ=0` turns the whole path off (benchmarks, troubleshooting).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# TIFF compression codes decoded here: none, LZW, JPEG, deflate (Adobe and old), Aperio
# JPEG 2000 YCbCr and RGB.
JPEG, APERIO_JP2K_YCBCR, APERIO_JP2K_RGB = 7, 33003, 33005
COMPRESSIONS = {1, 5, JPEG, 8, 32946, APERIO_JP2K_YCBCR, APERIO_JP2K_RGB}
PHOTOMETRICS = {1, 2, 6}  # min-is-black, RGB, YCbCr
# OpenSlide vendors whose levels are plain TIFF pages that OpenSlide reads tile by tile.
VENDORS = {"aperio", "generic-tiff", "hamamatsu"}
CACHE_BYTES = 64 << 20
# A region touching at least this many stored tiles, read from the main thread (thumbnail
# strips), is decoded on the shared pool. Reader threads decode on their own thread whatever
# the region: a grid tile with its context touches 3 x 3 stored tiles, and handing those to
# the pool's 4 threads from 8 readers halved reading (~700 against ~1400 tiles/s on 2 cores).
PARALLEL_TILES = 8


class Unsupported(Exception):
    """A stored tile this reader cannot decode faithfully: the library reads the level."""


def enabled() -> bool:
    return os.environ.get("STAINCTL_DIRECT_READ", "1").strip().lower() not in ("0", "no", "off")


@dataclass(frozen=True, kw_only=True)
class StoredLevel:
    """One pyramid level as its TIFF page stores it."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray  # byte offset of each tile, row-major
    counts: np.ndarray  # byte count of each tile (0: not stored, reads as glass)
    decode: Callable[..., Any] = field(repr=False)  # tifffile's decoder for this page
    compression: int
    samples: int
    jpegtables: bytes | None = field(default=None, repr=False)
    jpegheader: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        across = -(-self.width // self.tile_width)
        down = -(-self.height // self.tile_height)
        if min(self.width, self.height, self.tile_width, self.tile_height) < 1:
            raise ValueError("empty level or tile")
        if len(self.offsets) < across * down or len(self.counts) < across * down:
            raise ValueError(f"{len(self.offsets)} tile offsets for {across} x {down} tiles")

    @property
    def across(self) -> int:
        return -(-self.width // self.tile_width)


class _TileCache:
    """Decoded tiles by (reader, level, index), least recently used dropped past a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._items or tile.nbytes > self.budget:
                return
            self._items[key] = tile
            self._bytes += tile.nbytes
            self._shrink()

    def drop(self, owner: int) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == owner]:
                self._bytes -= self._items.pop(key).nbytes

    def limit(self, budget: int) -> int:
        """Set the byte budget (least recently used tiles dropped down to it); the old one."""
        with self._lock:
            old, self.budget = self.budget, max(0, budget)
            self._shrink()
            return old

    def _shrink(self) -> None:
        """Drop least recently used tiles down to the budget (the lock held)."""
        while self._bytes > self.budget:
            _, tile = self._items.popitem(last=False)
            self._bytes -= tile.nbytes


_CACHE = _TileCache(CACHE_BYTES)


@contextlib.contextmanager
def cache_budget(nbytes: int) -> Iterator[None]:
    """Within: the shared tile cache holds at most `nbytes` of decoded tiles (never more than
    its budget already was). For a caller that reads in an order whose reuse fits in less than
    CACHE_BYTES (readout's strips), so memory does not grow with the slide up to the full
    budget."""
    old = _CACHE.limit(min(nbytes, _CACHE.budget))
    try:
        yield
    finally:
        _CACHE.limit(old)
_READER_IDS = itertools.count()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="stainctl-decode")
        return _POOL


class DirectReader:
    """The levels of one slide file that can be read from their stored tiles."""

    def __init__(self, path: Path, levels: dict[int, StoredLevel]) -> None:
        self.path = path
        self.levels = levels
        self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._id = next(_READER_IDS)  # never reused, unlike id(): cache keys stay unique

    def serves(self, level: int) -> bool:
        return self._fd is not None and level in self.levels

    def give_up(self, level: int, reason: str) -> None:
        """Leave `level` to the library from now on."""
        if self.levels.pop(level, None) is not None:
            log.debug("direct tile reading off for level %d of %s: %s", level, self.path, reason)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at level pixels [x, x + width) x [y, y + height), all
        inside the level. Tiles that are not stored read as white glass, as OpenSlide's do."""
        lv = self.levels[level]
        tw, th = lv.tile_width, lv.tile_height
        cols = range(x // tw, (x + width - 1) // tw + 1)
        rows = range(y // th, (y + height - 1) // th + 1)
        if len(cols) == 1 and len(rows) == 1:
            ox, oy = x - cols[0] * tw, y - rows[0] * th
            # A whole stored tile (an aligned grid): decoded for this caller alone, not cached,
            # since no other region needs it, and handed over without a copy.
            whole = (ox, oy, width, height) == (0, 0, tw, th)
            tile = self._tile(level, rows[0] * lv.across + cols[0], cache=not whole)
            if tile is not None and tile.shape[0] >= oy + height and tile.shape[1] >= ox + width:
                part = tile[oy:oy + height, ox:ox + width]
                return part if tile.flags.writeable else part.copy()
        out = np.full((height, width, 3), 255, np.uint8)
        spots = [(r, c) for r in rows for c in cols]

        def paste(spot: tuple[int, int]) -> None:
            r, c = spot
            tile = self._tile(level, r * lv.across + c)
            if tile is None:
                return
            tx, ty = c * tw, r * th  # tile origin in level pixels
            x0, y0 = max(x, tx), max(y, ty)
            x1 = min(x + width, tx + tile.shape[1])
            y1 = min(y + height, ty + tile.shape[0])
            if x1 > x0 and y1 > y0:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]

        if len(spots) >= PARALLEL_TILES and threading.current_thread() is threading.main_thread():
            list(_pool().map(paste, spots))
        else:
            for spot in spots:
                paste(spot)
        return out

    def _tile(self, level: int, index: int, cache: bool = True) -> np.ndarray | None:
        """Decoded tile `index` of `level` as (rows, cols, 3) uint8, or None when not stored.
        A cached tile is shared, hence read-only; with `cache` False a fresh decode is not
        kept and stays writable."""
        key = (self._id, level, index)
        tile = _CACHE.get(key)
        if tile is not None:
            return tile
        lv = self.levels[level]
        offset, count = int(lv.offsets[index]), int(lv.counts[index])
        if count <= 0 or offset <= 0:
            return None
        fd = self._fd
        if fd is None:
            raise ValueError("the slide is closed")
        data = os.pread(fd, count, offset)
        if len(data) != count:
            raise ValueError(f"tile {index} of level {level} is cut short ({len(data)} of "
                             f"{count} bytes): the file is truncated")
        tile = _decode(lv, data, index)
        if cache:
            tile.setflags(write=False)  # shared through the cache
            _CACHE.put(key, tile)
        return tile

    def strip_bytes(self, level: int, width: float, side: float) -> int | None:
        """Bytes of the decoded stored tiles that square reads of `side` level pixels, along a
        strip `width` level pixels wide, reuse: the stored columns under the strip, times the
        stored rows under one read and the next row's (a column and a row more: a read starts
        anywhere in a stored tile). None when the level is not read here (the library caches).
        """
        if not self.serves(level):
            return None
        lv = self.levels[level]
        cols = math.ceil(width / lv.tile_width) + 1
        rows = math.ceil(side / lv.tile_height) + 2
        return cols * rows * lv.tile_width * lv.tile_height * 3

    def forget(self) -> None:
        """Drop this slide's decoded tiles from the shared cache (a caller done with a view,
        such as the thumbnail, whose tiles no later read needs)."""
        _CACHE.drop(self._id)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            _CACHE.drop(self._id)


def _decode(lv: StoredLevel, data: bytes, index: int) -> np.ndarray:
    if lv.compression in (APERIO_JP2K_YCBCR, APERIO_JP2K_RGB):
        arr = _decode_aperio_jp2k(data, lv.compression)
    else:
        arr, _, _ = lv.decode(data, index, jpegtables=lv.jpegtables, jpegheader=lv.jpegheader)
        arr = arr[0]  # (depth, rows, cols, samples) -> (rows, cols, samples)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _decode_aperio_jp2k(data: bytes, compression: int) -> np.ndarray:
    """Aperio stores a raw J2K codestream per tile; 33003 holds YCbCr components (no
    multi-component transform), which OpenSlide turns into RGB with its own integer tables:
    the same tables are used here so the pixels match."""
    import imagecodecs

    try:
        arr = imagecodecs.jpeg2k_decode(data)
    except Exception as err:  # e.g. chroma components of another size than OpenSlide expects
        raise Unsupported(f"JPEG 2000 tile: {err}") from err
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise Unsupported(f"JPEG 2000 tile of shape {arr.shape} ({arr.dtype})")
    if compression == APERIO_JP2K_YCBCR:
        arr = ycbcr_to_rgb(arr)
    return arr


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    i = np.arange(256, dtype=np.float64) - 128
    r_cr = np.round(1.402 * i).astype(np.int32)
    g_cb = np.round(65536 * (0.5 - 0.34414 * i)).astype(np.int64)
    g_cr = np.round(65536 * -0.71414 * i).astype(np.int64)
    b_cb = np.round(1.772 * i).astype(np.int32)
    return r_cr, g_cb, g_cr, b_cb


_R_CR, _G_CB, _G_CR, _B_CB = _tables()


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """OpenSlide's YCbCr -> RGB for JPEG 2000 tiles (make-tables.c's tables, same rounding)."""
    y = ycc[..., 0].astype(np.int32)
    cb, cr = ycc[..., 1], ycc[..., 2]
    g_chroma = ((_G_CB[cb] + _G_CR[cr]) >> 16).astype(np.int32)
    rgb = np.stack([y + _R_CR[cr], y + g_chroma, y + _B_CB[cb]], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def open_direct(path: Path, level_dimensions: Sequence[tuple[int, int]],
                vendor: str | None, backend: str) -> DirectReader | None:
    """A direct reader for the levels of `path` it can serve, or None (then OpenSlide or
    tiffslide reads everything). Never raises: any doubt leaves the slide to the library."""
    if not enabled():
        return None
    if backend == "openslide" and vendor not in VENDORS:
        return None
    if backend not in ("openslide", "tiffslide"):
        return None
    try:
        levels = _stored_levels(path, level_dimensions)
    except Exception as err:  # an odd file is simply read by the library
        log.debug("direct tile reading off for %s: %s", path, err)
        return None
    if not levels:
        return None
    try:
        return DirectReader(path, levels)
    except OSError as err:
        log.debug("direct tile reading off for %s: %s", path, err)
        return None


def _stored_levels(path: Path, level_dimensions: Sequence[tuple[int, int]]
                   ) -> dict[int, StoredLevel]:
    import tifffile

    out: dict[int, StoredLevel] = {}
    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            return out
        pages = [lvl.keyframe for lvl in tf.series[0].levels]
        for i, (w, h) in enumerate(level_dimensions):
            match = [p for p in pages if (p.imagewidth, p.imagelength) == (w, h)]
            if len(match) != 1:
                continue
            stored = _stored_level(match[0])
            if stored is not None:
                out[i] = stored
    return out


def _stored_level(page: Any) -> StoredLevel | None:
    ok = (page.is_tiled and page.tiledepth == 1 and page.imagedepth == 1
          and page.bitspersample == 8 and page.sampleformat == 1
          and int(page.compression) in COMPRESSIONS
          and int(page.photometric) in PHOTOMETRICS
          and (page.samplesperpixel == 3 or (page.samplesperpixel == 1
                                             and int(page.photometric) == 1))
          and (page.planarconfig == 1 or page.samplesperpixel == 1)
          and not page.extrasamples)
    if not ok:
        return None
    jpegheader = getattr(page, "jpegheader", None) if page.is_ndpi else None
    return StoredLevel(
        width=int(page.imagewidth), height=int(page.imagelength),
        tile_width=int(page.tilewidth), tile_height=int(page.tilelength),
        offsets=np.asarray(page.dataoffsets, np.int64),
        counts=np.asarray(page.databytecounts, np.int64),
        decode=page.decode, compression=int(page.compression),
        samples=int(page.samplesperpixel), jpegtables=page.jpegtables, jpegheader=jpegheader)
