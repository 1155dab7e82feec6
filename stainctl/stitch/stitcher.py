"""One tile store in, one pyramidal slide (and its thumbnail) out, in bounded memory.

The blended canvas is produced band by band by a child process (`canvas_process`; a thread where
that is not available) and written by stainctl's pyramid writer (`tiffwriter`, ADR 0004); an
output resampled to the slide's level 0 is streamed into libvips instead, which resamples and
writes it. The output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stainctl import interrupt
from stainctl.stitch.pyramid import PyramidOptions, save_pyramid, save_thumbnail
from stainctl.workspace.atomic import atomic_path, remove_stale
from stainctl.workspace.tilestore import TileStore

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

    from stainctl.stitch.stream import BlockSource

log = logging.getLogger(__name__)

DEFAULT_BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class Overlay:
    """The source slide's level 0, to resample the output onto it pixel for pixel."""

    width: int
    height: int
    mpp: float


@dataclass(frozen=True)
class StitchResult:
    path: Path
    thumbnail: Path
    width: int
    height: int
    mpp: float
    tiles: int


def stitch_store(store: TileStore, output: Path, *, options: PyramidOptions,
                 background: tuple[int, int, int], name: str, annotations: dict[str, str],
                 overlay: Overlay | None = None, in_process: bool = False,
                 written: np.ndarray | None = None) -> StitchResult:
    """`in_process`: blend on a thread of this process rather than in a child process (what
    platforms without memfd do). `written`: `store.written()`, when the caller has read it."""
    written = store.written() if written is None else written
    lay = store.layout
    with contextlib.ExitStack() as stack:
        blocks = _canvas_blocks(stack, store, background, written, in_process)
        if overlay is None:
            path, thumb = _write_canvas(blocks, output, lay.width, lay.height, lay.mpp,
                                        options=options, name=name, annotations=annotations)
            width, height, mpp = lay.width, lay.height, lay.mpp
        else:  # resampled to the slide's level 0: libvips resamples and writes
            from stainctl.stitch.stream import BlockSource

            source = BlockSource(lay.width, lay.height, blocks)
            # The canvas' buffers go as soon as the save is over, before the child is stopped.
            stack.callback(source.release)
            path, thumb, width, height, mpp = _save_source(
                source, output, lay.mpp, options=options, name=name, annotations=annotations,
                overlay=overlay)
    return StitchResult(path, thumb, width, height, mpp, int(written.sum()))


def _canvas_blocks(stack: contextlib.ExitStack[Any], store: TileStore,
                   background: tuple[int, int, int], written: np.ndarray,
                   in_process: bool) -> Iterator[np.ndarray]:
    """The blended canvas' row blocks, in order: from a child process where one starts, else
    from a thread of this one."""
    from stainctl.stitch import canvas_process

    if canvas_process.available() and not in_process:
        try:
            child = stack.enter_context(canvas_process.CanvasProcess(store, background, written))
            return child.blocks()
        except OSError as err:  # no process or memory to spare: blend on a thread instead
            log.debug("canvas process not started (%s); blending on a thread", err)
    from stainctl.stitch.blend import Canvas
    from stainctl.stitch.stream import prefetch

    return prefetch(Canvas(store, background, written).blocks())


def _write_canvas(blocks: Iterator[np.ndarray], output: Path, width: int, height: int,
                  mpp: float, *, options: PyramidOptions, name: str,
                  annotations: dict[str, str]) -> tuple[Path, Path]:
    """The canvas at its own resolution, written by stainctl's pyramid writer (ADR 0004)."""
    from stainctl.stitch.tiffwriter import write_pyramid

    description = _description(name, width, height, mpp, options, annotations)
    thumb = options.thumbnail(output)
    remove_stale(output)
    remove_stale(thumb)
    with atomic_path(output) as tmp:
        try:
            write_pyramid(blocks, width, height, tmp, mpp=mpp, description=description,
                          options=options)
        except OSError as err:
            if err.errno == errno.ENOSPC:  # name the output, not its temporary
                raise OSError(errno.ENOSPC, "No space left on device", str(output)) from err
            raise
        with atomic_path(thumb) as tmp_thumb:
            save_thumbnail(tmp, tmp_thumb)
    return output, thumb


def _save_source(source: BlockSource, output: Path, mpp: float, *, options: PyramidOptions,
                 name: str, annotations: dict[str, str], overlay: Overlay | None
                 ) -> tuple[Path, Path, int, int, float]:
    image = source.image()
    if overlay is not None:
        image = _resample(image, overlay)
        mpp = overlay.mpp
    width, height = image.width, image.height
    description = _description(name, width, height, mpp, options, annotations)

    thumb = options.thumbnail(output)
    remove_stale(output)
    remove_stale(thumb)
    # libvips calls back into Python to read the canvas: a signal must not raise inside that
    # callback (cffi would print and drop it, and the save would go on), so it is recorded,
    # the next read stops the save, and the section raises it once libvips has returned. The
    # save runs on a worker thread so that the main thread is free to receive the signal.
    with interrupt.deferred(), atomic_path(output) as tmp:
        try:
            interrupt.run_watched(
                lambda: save_pyramid(image, tmp, mpp, description, options))
        except Exception as err:
            if source.error is not None:
                raise source.error from err
            if "No space left" in str(err):
                raise OSError(errno.ENOSPC, "No space left on device", str(output)) from err
            raise
        if source.error is not None:  # a short read that libvips did not notice
            raise source.error
        with atomic_path(thumb) as tmp_thumb:
            save_thumbnail(tmp, tmp_thumb)
    return output, thumb, width, height, mpp


def _resample(image: Any, overlay: Overlay) -> Any:
    """Scale to the slide's level-0 size exactly (the last pixel row/column may need padding or
    trimming after rounding)."""
    sx, sy = overlay.width / image.width, overlay.height / image.height
    image = image.resize(sx, vscale=sy)
    if image.width != overlay.width or image.height != overlay.height:
        image = image.gravity("north-west", overlay.width, overlay.height, extend="copy")
    return image


def _description(name: str, width: int, height: int, mpp: float, options: PyramidOptions,
                 annotations: dict[str, str]) -> str:
    marker = annotations.get("marker", "")
    source = Path(annotations.get("source", name)).name
    summary = (f"stainctl virtual {marker} stain of {source}; model "
               f"{annotations.get('model', '?')}; generated, not a real stain")
    if options.format == "tiff":
        items = "; ".join(f"{k}={v}" for k, v in annotations.items())
        return f"{summary}; {width}x{height} at {mpp:.6g} um/px; {items}"
    from stainctl.stitch.ome import ome_xml

    return ome_xml(name=name, width=width, height=height, mpp=mpp, description=summary,
                   annotations=annotations)
