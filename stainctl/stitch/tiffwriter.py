"""Writing the blended canvas as a tiled pyramidal TIFF with tifffile and imagecodecs (ADR 0004).

The canvas arrives as row blocks, in order. Level 0 is cut into bands of one tile row; each band's
tiles are encoded on a thread pool (imagecodecs releases the GIL) and tifffile writes the encoded
tiles in order as they come. Each reduced level is made band by band from the level above (the
mean of 2 x 2 pixels, as libvips' pyramid) and its encoded tiles wait in an unlinked spill file
beside the output until level 0 is written; then they follow, as SubIFDs of level 0 (OME-TIFF) or
as pages (plain TIFF, which OpenSlide reads). Memory holds two bands per level, whatever the
slide's height.

Why not libvips, which wrote these pyramids before: on 2 cores its in-memory save alone kept ~1.6
cores busy, and streaming the canvas into it made stitch 1.3x that save; with this writer the
whole stitch process measured 1.09x it, with the same pixels at every level (bench/RESULTS.md,
stitch). libvips still writes when the output is resampled to the slide's level 0 (`--level0`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from stainctl.stitch.pyramid import PyramidOptions

Encoder = Callable[[np.ndarray], bytes]


def level_shapes(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """(width, height) of each level: halved, rounding down, until one tile holds the level or a
    side is down to one pixel (the levels libvips' `pyramid=True` makes)."""
    shapes = [(width, height)]
    while max(shapes[-1]) > tile and min(shapes[-1]) > 1:
        w, h = shapes[-1]
        shapes.append((w // 2, h // 2))
    return shapes


def tile_codec(options: PyramidOptions) -> tuple[Encoder, dict[str, Any]]:
    """How one (tile x tile x 3) tile is encoded, and tifffile's tags for those bytes."""
    import imagecodecs

    if options.compression == "jpeg":
        # What libvips writes (docs/NOTES.md), from the same libjpeg-turbo with the same tables,
        # so the same decoded pixels: RGB without chroma subsampling at Q >= 90, YCbCr 4:2:0
        # below (2.6x smaller at Q 80).
        q = options.quality
        rgb = q >= 90
        space, sampling = ("rgb", "444") if rgb else ("ycbcr", "420")

        def jpeg(tile: np.ndarray) -> bytes:
            return bytes(imagecodecs.jpeg8_encode(tile, level=q, outcolorspace=space,
                                                  subsampling=sampling))

        # The tags must say which: OpenSlide follows them (RGB-encoded tiles tagged YCbCr, as
        # tifffile tags JPEG by default, show in false colours).
        if rgb:
            return jpeg, {"compression": "jpeg", "subsampling": (1, 1),
                          "compressionargs": {"outcolorspace": "RGB"}}
        return jpeg, {"compression": "jpeg", "subsampling": (2, 2)}
    if options.compression == "none":
        return (lambda tile: tile.tobytes()), {"compression": None}
    encode: Callable[[Any], Any] = (imagecodecs.lzw_encode if options.compression == "lzw"
                                    else imagecodecs.zlib_encode)

    def lossless(tile: np.ndarray) -> bytes:
        # The horizontal predictor (TIFF predictor 2, libvips' default): each sample minus the
        # same sample of the pixel to its left, which compresses tissue far better.
        return bytes(encode(imagecodecs.delta_encode(tile, axis=1).tobytes()))

    name = "lzw" if options.compression == "lzw" else "adobe_deflate"
    return lossless, {"compression": name, "predictor": 2}


def _pad(tile: np.ndarray, side: int) -> np.ndarray:
    """A tile of `side` x `side` (TIFF tiles are whole at the image's edges too); zeros beyond
    the image, as libvips pads."""
    if tile.shape[0] == side and tile.shape[1] == side:
        return np.ascontiguousarray(tile)
    full = np.zeros((side, side, 3), np.uint8)
    full[:tile.shape[0], :tile.shape[1]] = tile
    return full


class _Band:
    """One level's current band (a tile row) filled row by row, and the encodes of the band
    before, which may still run: two buffers, so filling one never touches what is encoded."""

    def __init__(self, width: int, side: int, pool: ThreadPoolExecutor, encode: Encoder) -> None:
        self.width, self.side, self.pool, self.encode = width, side, pool, encode
        self.buffers = [np.empty((side, width, 3), np.uint8) for _ in range(2)]
        self.current = 0
        self.rows = 0

    @property
    def array(self) -> np.ndarray:
        return self.buffers[self.current]

    def fill(self, rows: np.ndarray) -> np.ndarray:
        """Copy as many of `rows` as fit; return the rest."""
        n = min(self.side - self.rows, len(rows))
        self.array[self.rows:self.rows + n] = rows[:n]
        self.rows += n
        return rows[n:]

    def _encode(self, tile: np.ndarray) -> bytes:
        return self.encode(_pad(tile, self.side))  # the copy on the pool's thread too

    def submit(self) -> tuple[np.ndarray, list[Future[bytes]]]:
        """Encode the filled band's tiles on the pool and switch to the other buffer (whose
        encodes the caller has collected). Returns the band's rows and the encodes."""
        band = self.array[:self.rows]
        futures = [self.pool.submit(self._encode, band[:, x:x + self.side])
                   for x in range(0, self.width, self.side)]
        self.current, self.rows = 1 - self.current, 0
        return band, futures


class _Reduced:
    """A reduced level: takes the rows of the level above, halves them, and appends its
    encoded tiles, in order, to the spill file."""

    def __init__(self, width: int, height: int, band: _Band, spill: IO[bytes],
                 below: _Reduced | None) -> None:
        self.width, self.height = width, height
        self.band, self.spill, self.below = band, spill, below
        self.done = 0  # rows of this level handed to the encoder
        self.carry: np.ndarray | None = None  # an odd last row of the level above
        self.pending: list[Future[bytes]] = []
        self.tiles: list[tuple[int, int]] = []  # (offset, length) in the spill file

    def add(self, rows: np.ndarray) -> None:
        import cv2

        if self.carry is not None:
            rows = np.concatenate([self.carry, rows])
            self.carry = None
        if len(rows) % 2:
            self.carry, rows = rows[-1:].copy(), rows[:-1]
        # The level's size rounds down: a last odd row or column of the level above is left.
        left = self.height - self.done - self.band.rows
        rows = rows[:2 * left, :2 * self.width]
        if not len(rows):
            return
        # INTER_AREA at exactly half: the mean of each 2 x 2, rounded.
        half = cv2.resize(rows, (self.width, len(rows) // 2), interpolation=cv2.INTER_AREA)
        while len(half):
            half = self.band.fill(half)
            if self.band.rows == self.band.side or self.done + self.band.rows == self.height:
                self._flush()

    def _flush(self) -> None:
        self._collect()
        self.done += self.band.rows
        band, self.pending = self.band.submit()
        if self.below is not None:
            self.below.add(band)

    def _collect(self) -> None:
        for f in self.pending:
            data = f.result()
            self.tiles.append((self.spill.tell(), len(data)))
            self.spill.write(data)
        self.pending = []

    def finish(self) -> None:
        if self.band.rows:  # rows the level above left short of a whole last band
            self._flush()
        self._collect()
        if self.below is not None:
            self.below.finish()

    def encoded(self) -> Iterator[bytes]:
        for offset, length in self.tiles:
            self.spill.seek(offset)
            yield self.spill.read(length)


def write_pyramid(blocks: Iterable[np.ndarray], width: int, height: int, path: Path, *,
                  mpp: float, description: str, options: PyramidOptions,
                  workers: int | None = None) -> int:
    """Write the canvas given as row `blocks` (in order; each may be reused by its producer once
    two more are taken) to `path` as a tiled pyramidal TIFF: OME-TIFF with SubIFDs or plain
    TIFF pages, as `options` say, with resolution tags for `mpp` µm/px and `description` as the
    first ImageDescription. Returns the number of levels."""
    import tifffile

    from stainctl.cluster.pin import io_threads

    side = options.tile
    shapes = level_shapes(width, height, side)
    encode, codec = tile_codec(options)
    with ThreadPoolExecutor(workers or io_threads(), thread_name_prefix="tile-encoder") as pool, \
            tempfile.TemporaryFile(dir=path.parent, prefix=".stainctl-spill-") as spill:
        reduced: list[_Reduced] = []
        below: _Reduced | None = None
        for w, h in reversed(shapes[1:]):
            below = _Reduced(w, h, _Band(w, side, pool, encode), spill, below)
            reduced.insert(0, below)

        def level0() -> Iterator[bytes]:
            band = _Band(width, side, pool, encode)
            previous: list[Future[bytes]] = []
            for block in blocks:
                while len(block):
                    block = band.fill(block)
                    if band.rows == side:
                        yield from _next_band(band, previous)
            if band.rows:
                yield from _next_band(band, previous)
            # Before the last tiles: tifffile stops asking once it has them all.
            if reduced:
                reduced[0].finish()
            for f in previous:
                yield f.result()

        def _next_band(band: _Band, previous: list[Future[bytes]]) -> Iterator[bytes]:
            # The new band's tiles encode while the reduced levels take its rows and the last
            # band's tiles are written: the pool stays busy.
            rows, futures = band.submit()
            if reduced:
                reduced[0].add(rows)
            for f in previous:
                yield f.result()
            previous[:] = futures

        per_cm = 1e4 / mpp
        common: dict[str, Any] = {"tile": (side, side), "dtype": np.uint8,
                                  "photometric": "rgb", "metadata": None, **codec}
        ome = options.format == "ome-tiff"
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            # UTF-8 bytes: OME-XML says µm, and tifffile takes str tags as ASCII only.
            tif.write(level0(), shape=(height, width, 3), description=description.encode(),
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                      subifds=len(reduced) if ome else None, **common)
            for k, level in enumerate(reduced, 1):
                # Each level's own pixel size, 2^k level-0 pixels (an odd last row or column
                # is left out, not spread); libvips repeated level 0's on every level.
                res = (per_cm / 2**k, per_cm / 2**k)
                tif.write(level.encoded(), shape=(level.height, level.width, 3),
                          subfiletype=1, resolution=res, resolutionunit="CENTIMETER", **common)
    return len(shapes)
