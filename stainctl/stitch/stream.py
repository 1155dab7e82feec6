"""Feeding row blocks to libvips without writing the canvas anywhere (`stitch --level0`, which
libvips resamples and writes; the canvas at its own resolution goes through `tiffwriter`).

libvips can build a pyramid from a sequential source while holding only a few tile rows. We hand it
a seekable custom source that reads as an uncompressed, stripped BigTIFF: the header is made by
tifffile (for a sparse file that is never filled), the pixel data are served from the blocks as
libvips asks for them. With sequential access libvips reads the strips in order, so only the
current blocks are held. Measured: as fast as saving the same raster from memory (docs/NOTES.md).
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

ROWS_PER_STRIP = 64
HELD = 2  # blocks a BlockSource holds: the current one and the previous (a strip may straddle)


def tiff_header(width: int, height: int) -> bytes:
    """Header and IFD of an uncompressed RGB BigTIFF whose pixel rows follow contiguously."""
    import tifffile

    with tempfile.TemporaryDirectory(prefix="stainctl-") as tmp:
        path = os.path.join(tmp, "header.tif")
        # Sparse: only the header is written to disk. No description (docs/NOTES.md: libvips would
        # copy tifffile's JSON description into the output).
        mm = tifffile.memmap(path, shape=(height, width, 3), dtype=np.uint8, photometric="rgb",
                             bigtiff=True, rowsperstrip=ROWS_PER_STRIP, metadata=None)
        del mm
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            offset = int(page.dataoffsets[0])
            assert page.is_contiguous, "tifffile wrote a non-contiguous page"
        with open(path, "rb") as fh:
            return fh.read(offset)


class BlockSource:
    """A pyvips source over a TIFF header plus row blocks served in order.

    An exception raised by the blocks, or a signal received meanwhile (`interrupt`), is kept in
    `error` (libvips only sees a short read) so the caller can raise it after the save fails.
    """

    def __init__(self, width: int, height: int, blocks: Iterable[np.ndarray]) -> None:
        self.width, self.height = width, height
        self.header = tiff_header(width, height)
        self.total = len(self.header) + width * height * 3
        self.error: BaseException | None = None
        self._blocks: Iterator[np.ndarray] = iter(blocks)
        self._source: Any = None
        self._pos = 0
        # (start offset, bytes) of the blocks still needed: the current one, and the previous
        # in case a strip straddles two blocks.
        self._window: list[tuple[int, memoryview]] = []
        self._end = len(self.header)

    def image(self) -> Any:
        import pyvips

        source = pyvips.SourceCustom()
        source.on_read(self._read)
        source.on_seek(self._seek)
        # libvips holds only a C handle: keep the Python object alive as long as this one.
        self._source = source
        return pyvips.Image.tiffload_source(source, access="sequential")

    def release(self) -> None:
        """Let go of the blocks and of libvips' source: the source's callbacks and this object
        refer to each other, so without this the last blocks (views of the canvas' buffers)
        would live until a garbage collection."""
        self._window = []
        self._blocks = iter(())
        self._source = None

    def _seek(self, offset: int, whence: int) -> int:
        base = {0: 0, 1: self._pos, 2: self.total}[whence]
        self._pos = base + offset
        return self._pos

    def _read(self, size: int) -> bytes | memoryview:
        from stainctl import interrupt

        if self.error is not None:  # libvips may read on after a failed read: keep the cause
            return b""
        try:
            interrupt.check()  # a signal during the save: a short read makes libvips stop
            chunk = self._chunk(self._pos, size)
        except BaseException as err:
            self.error = err
            return b""
        self._pos += len(chunk)
        return chunk

    def _chunk(self, pos: int, size: int) -> bytes | memoryview:
        if pos < len(self.header):
            return self.header[pos:pos + size]
        while pos >= self._end:
            block = next(self._blocks, None)
            if block is None:
                if self._end < self.total:
                    raise RuntimeError(f"the canvas ended at byte {self._end} of {self.total}")
                return b""
            view = np.ascontiguousarray(block).data.cast("B")
            self._window = [*self._window[1 - HELD:], (self._end, view)]
            self._end += len(view)
        for start, view in self._window:
            if start <= pos < start + len(view):
                return view[pos - start:pos - start + size]
        raise RuntimeError(f"libvips read back to byte {pos}, which is no longer held")


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Produce `items` on a background thread, `depth` ahead of the consumer: reading and
    blending the next band (numpy, OpenCV, zarr release the GIL) overlaps libvips' encoding."""
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, item))
            q.put((False, None))
        except BaseException as err:
            q.put((False, err))

    thread = threading.Thread(target=produce, name="stainctl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
