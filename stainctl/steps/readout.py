"""The readout step: DAB area, H-score and nuclear index of IHC slides, per tile and per slide.

Per slide: open it (its µm/px is required, never guessed), a thumbnail gives the tissue mask and
the glass colour, a grid of `tile_size` tiles at `target_mpp` covers the tissue, and every tile is
read (the direct tile reader where the file allows) with a margin, so a nucleus cut by a tile edge
is found whole and counted in the tile holding its centre. Each tile's record is appended to
`OUT/.readout/<name>.tiles.jsonl` as it is made: a rerun with the same parameters measures only
the tiles not yet there (an interrupted run resumes), a rerun with other parameters starts over.
The slide's record is the sum of its tiles'; `readout/outputs.py` writes the CSV, heat maps and
GeoJSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl import heap
from stainctl.errors import SlideError
from stainctl.readout.measure import ReadoutParams, sum_readouts
from stainctl.readout.records import SlideReadout, TileRecord, slide_row
from stainctl.steps.report import (
    BatchResult,
    Progress,
    SilentProgress,
    SlideOutcome,
    params_hash,
    unexpected,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from stainctl.slide.grid import Grid
    from stainctl.slide.reader import Slide

log = logging.getLogger(__name__)

MARGIN_UM = 16.0  # more than a nucleus is wide: one cut by the tile edge is seen whole
# Tiles are read in vertical strips of this many grid columns, each top to bottom: the stored
# tiles that neighbouring reads share (a tile's margin, a stored tile under two grid tiles)
# are then all decoded recently, so the decoded-tile cache needs a strip's width of them, not
# a whole row of the slide's (which grows with the slide).
STRIP_COLUMNS = 8
# H&E has eosin and no DAB; a slide whose tissue carries more eosin than DAB is not DAB IHC.
NO_DAB_WARNING = ("no DAB staining found: the slide looks like H&E (eosin, no DAB); readout "
                  "measures DAB IHC slides (real or virtual), so its numbers mean nothing here")


@dataclass(frozen=True, kw_only=True)
class ReadoutInput:
    """A slide to read out: its name in the outputs, its path, an mpp override."""

    name: str
    path: Path
    mpp: float | None = None


@dataclass(frozen=True, kw_only=True)
class ReadoutOptions:
    marker: str
    nuclear: bool
    out: Path
    params: ReadoutParams = field(default_factory=ReadoutParams)
    target_mpp: float = 0.5
    tile_size: int = 512
    min_tissue: float = 0.05  # a tile with less tissue (thumbnail mask) is not read
    workers: int = 2

    def __post_init__(self) -> None:
        from stainctl.errors import UsageError

        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise UsageError(f"--target-mpp must be positive, got {self.target_mpp}")
        if self.tile_size < 64:
            raise UsageError(f"--tile-size must be at least 64, got {self.tile_size}")
        if not 0 <= self.min_tissue <= 1:
            raise UsageError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}")

    def as_dict(self) -> dict[str, object]:
        # Not `workers`: the same tiles give the same numbers on any number of threads.
        return {"marker": self.marker, "nuclear": self.nuclear, "target_mpp": self.target_mpp,
                "tile_size": self.tile_size, "min_tissue": self.min_tissue,
                "params": asdict(self.params)}


def read_out(inputs: list[ReadoutInput], options: ReadoutOptions,
             progress: Progress | None = None) -> tuple[BatchResult, list[SlideReadout]]:
    """Read out every slide; one that fails is said in its outcome and the others go on."""
    from stainctl.readout.outputs import write_outputs

    progress = progress or SilentProgress()
    inputs = unique_names(inputs)
    result = BatchResult(step="readout")
    done: list[SlideReadout] = []
    # Threads allocate from glibc's main arena from now on: a tile thread's own arena kept
    # freed tile buffers, fragmented, and the peak crept with the number of tiles.
    heap.single_arena()
    for item in inputs:
        try:
            slide = _read_out_slide(item, options, progress)
        except SlideError as err:
            result.slides.append(SlideOutcome(item.name, str(item.path), "failed",
                                              str(err), code=err.code))
            _log_failure(progress, item.name, str(err))
            continue
        except Exception as err:  # one bad slide (a corrupt tile) does not stop the batch
            log.debug("readout of %s failed", item.path, exc_info=True)
            reason = unexpected(err, options.out)
            result.slides.append(SlideOutcome(item.name, str(item.path), "failed", reason))
            _log_failure(progress, item.name, reason)
            continue
        done.append(slide)
        message = _summary(slide)
        outcome = SlideOutcome(item.name, str(item.path), "done", message,
                               details=slide_row(slide))
        result.slides.append(outcome.warn(slide.warning))
        if slide.warning:
            progress.log(f"warning: {slide.warning}", warning=True)
    write_outputs(done, options.out)
    return result, done


def unique_names(inputs: list[ReadoutInput]) -> list[ReadoutInput]:
    """Inputs whose names are unique (two `a.svs` from two folders: `a`, `a-2`), as the names
    are the output files' and the CSV rows'."""
    import dataclasses

    seen: dict[str, int] = {}
    out = []
    for item in inputs:
        n = seen.get(item.name, 0) + 1
        seen[item.name] = n
        out.append(item if n == 1 else dataclasses.replace(item, name=f"{item.name}-{n}"))
    return out


def read_out_virtual(outcomes: list[SlideOutcome], virtual: dict[str, Path], marker: str,
                     out: Path, progress: Progress) -> None:
    """`translate --readout`: read out the main job's virtual slides into `out` and put each
    one's index (or DAB area and H-score) in its outcome's message and details. A marker that
    readout does not know is read as DAB area and H-score only; a slide whose readout fails
    keeps its virtual slide, and the failure is said in its message."""
    from stainctl.errors import UsageError
    from stainctl.readout.markers import is_nuclear, resolve_marker

    try:
        stain = resolve_marker(marker)
    except UsageError:
        stain = marker.lower()
    inputs = [ReadoutInput(name=f"{o.slide}", path=virtual[o.slide]) for o in outcomes
              if o.slide in virtual]
    if not inputs:
        return
    options = ReadoutOptions(marker=stain, nuclear=is_nuclear(stain), out=out)
    result, _ = read_out(inputs, options, progress)
    by_slide = {r.slide: r for r in result.slides}
    for o in outcomes:
        r = by_slide.get(o.slide)
        if r is None:
            continue
        if r.state == "failed":
            o.message = f"{o.message}; readout failed ({r.message})"
            continue
        o.details["readout"] = r.details
        index = r.details.get("index_pct")
        text = (f"{stain} index {index:.1f}% ({r.details['positive_nuclei']}/"
                f"{r.details['nuclei']} nuclei" if isinstance(index, float)
                else f"DAB+ {r.details['dab_positive_area_pct']:.1f}%, H-score "
                     f"{r.details['h_score']:.0f} (")
        # Said to be of the virtual slide, and where the table is: a number without either
        # reads like a measurement of the glass slide.
        o.message = f"{o.message}; readout: {text} of the virtual slide, in {out / 'readout.csv'})"


def _log_failure(progress: Progress, name: str, reason: str) -> None:
    """The failure's line under this slide's name: one that fails before its tiles are counted
    was logged under the previous slide's ("readout crop: failed: .../ihc.png: ...")."""
    progress.start(f"readout {name}", 0)
    progress.log(f"failed: {reason}", warning=True)


def _summary(slide: SlideReadout) -> str:
    t = slide.total
    text = f"DAB+ {100 * t.positive_fraction:.1f}% of tissue, H-score {t.h_score:.0f}"
    if t.index is not None:
        text = f"{slide.marker} index {100 * t.index:.1f}% ({t.positive_nuclei}/{t.nuclei} " \
               f"nuclei), " + text
    return text


def _read_out_slide(item: ReadoutInput, options: ReadoutOptions,
                    progress: Progress) -> SlideReadout:
    from concurrent.futures import ThreadPoolExecutor

    from stainctl.slide.reader import open_slide

    slide = open_slide(item.path, item.mpp)
    try:
        pool = ThreadPoolExecutor(options.workers)
        try:
            with opencv_on_calling_thread():
                return _read_out_open(slide, item, options, progress, pool)
        finally:  # tiles still being read finish before the slide is closed
            pool.shutdown(cancel_futures=True)
    finally:
        slide.close()


def _read_out_open(slide: Slide, item: ReadoutInput, options: ReadoutOptions,
                   progress: Progress, pool: ThreadPoolExecutor) -> SlideReadout:
    from stainctl.readout.background import glass_white
    from stainctl.readout.measure import measure_tile
    from stainctl.slide.grid import GridParams, make_grid, tissue_fractions
    from stainctl.slide.thumbnail import read_thumbnail, thumbnail_mpp
    from stainctl.slide.tissue import TissueParams, check_brightfield, tissue_mask

    mpp = slide.require_mpp()
    w0, h0 = slide.dimensions
    t_mpp = thumbnail_mpp(mpp, w0, h0)
    thumb = read_thumbnail(slide, t_mpp)
    check_brightfield(thumb, item.path, False,
                      hint="readout measures brightfield DAB IHC slides")
    mask = tissue_mask(thumb, t_mpp, TissueParams())
    white = glass_white(thumb)
    # Now, not after the tiles: its temporaries (float densities of the thumbnail's
    # tissue) are then freed before the tiles are read, not added to their peak.
    warning = _stain_warning(thumb, mask, white)
    grid = make_grid(w0, h0, mpp, GridParams(target_mpp=options.target_mpp,
                                             tile_size=options.tile_size, min_tissue=0.0),
                     slide.level_downsamples)
    fractions = tissue_fractions(mask, w0, h0, grid)
    xs, ys = grid.origins()
    chosen = np.flatnonzero(fractions >= max(options.min_tissue, 1e-9))
    store = _TileLog(options.out / ".readout" / f"{item.name}.tiles.jsonl",
                     params_hash({**options.as_dict(), "white": list(white)}))
    records = store.load()
    todo = [i for i in chosen if (int(xs[i]), int(ys[i])) not in records]
    progress.start(f"readout {item.name}", len(chosen))
    progress.advance(len(chosen) - len(todo))
    scale = grid.extent0 / options.tile_size  # level-0 px per tile px
    margin = max(1, round(MARGIN_UM / grid.mpp))
    level = slide.best_level(scale)
    ds = slide.level_downsamples[level]
    order = strip_order([int(i) for i in todo], grid.cols)

    def measure(i: int) -> TileRecord:
        x0, y0 = int(xs[i]), int(ys[i])
        rgb, valid = _read_tile(slide, x0, y0, grid.extent0, options.tile_size, margin,
                                level, ds, w0, h0)
        # A tile within the tissue (most of a slide's) has the tissue mask all ones: the
        # valid pixels are its tissue, without warping the mask (~0.3 ms a tile).
        inside = _all_tissue(mask, x0, y0, grid.extent0, margin, rgb.shape[0], w0, h0)
        readout = measure_tile(rgb, grid.mpp, options.params, options.nuclear,
                               white=white, valid=valid,
                               tissue=valid if inside else _tile_mask(
                                   mask, x0, y0, grid.extent0, margin, rgb.shape[0], w0, h0))
        return TileRecord(x0=x0, y0=y0, extent0=float(grid.extent0), readout=readout)

    # Tiles are read and measured on `workers` threads (the readers, OpenCV and
    # scikit-image's flood release the GIL for most of it), kept fed up to `2 * batch`
    # tiles ahead of the one awaited: a map per batch made every thread wait for the
    # batch's slowest tile (~6 % of a slide's time with nuclei). Only this thread writes
    # the log, a batch at a time, so a signal stops the slide between batches with all
    # before saved (tiles in flight are measured again by the rerun).
    from collections import deque
    from concurrent.futures import Future

    from stainctl import interrupt

    batch = max(1, 4 * options.workers)
    queue: deque[Future[TileRecord]] = deque()
    measured: list[TileRecord] = []
    with store.appending() as append, strip_cache(slide, level, grid,
                                                  options.tile_size, margin):

        def take(future: Future[TileRecord]) -> None:
            rec = future.result()
            measured.append(rec)
            records[(rec.x0, rec.y0)] = rec
            progress.advance(1)
            if len(measured) >= batch:
                append(measured)
                measured.clear()
                interrupt.check()

        try:
            for i in order:
                queue.append(pool.submit(measure, int(i)))
                if len(queue) >= 2 * batch:
                    take(queue.popleft())
            while queue:
                take(queue.popleft())
        finally:  # a tile that fails keeps the tiles before it
            append(measured)
    tiles = tuple(records[(int(xs[i]), int(ys[i]))] for i in chosen)
    total = sum_readouts([t.readout for t in tiles], nuclear=options.nuclear)
    return SlideReadout(name=item.name, path=item.path, marker=options.marker, mpp=mpp,
                        width0=w0, height0=h0, tiles=tiles, total=total,
                        warning=warning)


def strip_order(indices: list[int], cols: int,
                strip: int = STRIP_COLUMNS) -> NDArray[np.int64]:
    """Row-major grid `indices` (of a grid `cols` wide) in reading order: strips of `strip`
    columns, left to right; in each strip its rows top to bottom, each row left to right."""
    idx = np.asarray(indices, dtype=np.int64)
    row, col = np.divmod(idx, cols)
    return idx[np.lexsort((col, row, col // strip))]


@contextlib.contextmanager
def opencv_on_calling_thread() -> Iterator[None]:
    """Within: OpenCV runs on the thread that calls it. Readout spreads its tiles over its own
    threads already; OpenCV's pool beside them made no measured difference in time, only more
    threads holding memory."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


@contextlib.contextmanager
def strip_cache(slide: Slide, level: int, grid: Grid, size: int, margin: int,
                strip: int = STRIP_COLUMNS) -> Iterator[None]:
    """Within: the shared decoded-tile cache holds what reads in strips of `strip` grid columns
    reuse (`strip_cache_bytes`), not its full budget, and starts without `slide`'s tiles (the
    thumbnail's, which no tile read needs), their memory given back: what readout holds then
    does not depend on the slide's size."""
    from stainctl.slide.direct import cache_budget

    budget = strip_cache_bytes(slide, level, grid, size, margin, strip)
    if slide.direct is not None:
        slide.direct.forget()
    heap.trim(0.0)
    with cache_budget(budget) if budget is not None else contextlib.nullcontext():
        yield


def strip_cache_bytes(slide: Slide, level: int, grid: Grid, size: int, margin: int,
                      strip: int = STRIP_COLUMNS) -> int | None:
    """Bytes of the decoded stored tiles that reads of a strip of `strip` grid columns reuse
    (`DirectReader.strip_bytes`); None when the level is not read from its stored tiles."""
    if slide.direct is None:
        return None
    ds = slide.level_downsamples[level]
    side = (size + 2 * margin) * grid.extent0 / size / ds  # a read, in level pixels
    width = (strip - 1) * grid.stride0 / ds + side
    return slide.direct.strip_bytes(level, width, side)


def _read_tile(slide: Slide, x0: int, y0: int, extent0: float, size: int, margin: int,
               level: int, ds: float, w0: int, h0: int
               ) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """The tile with `margin` tile pixels around it, at the tile's resolution, and the mask of
    its pixels that are the tile itself and inside the slide."""
    import cv2

    scale = extent0 / size
    full = size + 2 * margin
    m0 = margin * scale
    lx, ly = x0 - m0, y0 - m0
    lw = max(1, round(full * scale / ds))
    region = slide.read_region(round(lx), round(ly), level, lw, lw)
    if region.shape[0] != full or region.shape[1] != full:
        region = cv2.resize(region, (full, full), interpolation=cv2.INTER_AREA)
    valid = np.zeros((full, full), dtype=bool)
    valid[margin:margin + size, margin:margin + size] = True
    # Pixels past the slide's right or bottom edge are white padding, not glass to measure.
    inside_x = math.floor((w0 - lx) / scale)
    inside_y = math.floor((h0 - ly) / scale)
    valid[:, max(0, inside_x):] = False
    valid[max(0, inside_y):, :] = False
    return region, valid


def _tile_mask(mask: NDArray[np.bool_], x0: int, y0: int, extent0: float, margin: int,
               full: int, w0: int, h0: int) -> NDArray[np.bool_]:
    """The slide's tissue mask (thumbnail) over a tile read with `margin`, at tile pixels."""
    import cv2

    m = _tile_to_thumbnail(mask.shape, x0, y0, extent0, margin, full, w0, h0)
    # Bool viewed as 0/1 bytes both ways: converting the whole thumbnail mask per tile cost
    # more than the warp itself.
    out = cv2.warpAffine(np.ascontiguousarray(mask).view(np.uint8), m, (full, full),
                         flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.view(bool)


def _tile_to_thumbnail(shape: tuple[int, ...], x0: int, y0: int, extent0: float, margin: int,
                       full: int, w0: int, h0: int) -> NDArray[np.float64]:
    """(2, 3) affine map from the pixels of a tile read with `margin` to the thumbnail's."""
    mh, mw = shape[:2]
    sx, sy = mw / w0, mh / h0
    scale = extent0 / (full - 2 * margin)
    lx0, ly0 = x0 - margin * scale, y0 - margin * scale
    return np.array([[scale * sx, 0, lx0 * sx], [0, scale * sy, ly0 * sy]], dtype=np.float64)


def _all_tissue(mask: NDArray[np.bool_], x0: int, y0: int, extent0: float, margin: int,
                full: int, w0: int, h0: int) -> bool:
    """Whether `_tile_mask` is all ones: every thumbnail pixel its nearest-neighbour warp can
    sample (those within a pixel of the tile's footprint, all inside the mask) is tissue."""
    m = _tile_to_thumbnail(mask.shape, x0, y0, extent0, margin, full, w0, h0)
    c0, r0 = math.floor(m[0, 2]) - 1, math.floor(m[1, 2]) - 1
    c1 = math.ceil(m[0, 0] * (full - 1) + m[0, 2]) + 2
    r1 = math.ceil(m[1, 1] * (full - 1) + m[1, 2]) + 2
    if c0 < 0 or r0 < 0 or c1 > mask.shape[1] or r1 > mask.shape[0]:
        return False  # samples outside the mask read as background
    return bool(mask[r0:r1, c0:c1].all())


def _stain_warning(thumb: NDArray[np.uint8], mask: NDArray[np.bool_],
                   white: tuple[int, int, int]) -> str | None:
    """NO_DAB_WARNING when the tissue carries more eosin than DAB (an H&E slide)."""
    from stainctl.stain.deconvolution import DAB, stain_density

    if thumb.size == 0:
        return None
    anywhere = not mask.any()  # no tissue found: the whole thumbnail
    # Summed over bands of rows: the densities of a whole thumbnail's tissue at once were the
    # overview stage's largest temporaries (~25 bytes a pixel), growing with the slide.
    rows = max(1, (1 << 20) // max(1, thumb.shape[1]))
    eosin = dab = 0.0
    for top in range(0, thumb.shape[0], rows):
        band = thumb[top:top + rows, :, :3]
        tissue = band.reshape(1, -1, 3) if anywhere else band[mask[top:top + rows]][None]
        eosin += float(stain_density(tissue, 1, white).sum(dtype=np.float64))  # H-E-DAB col 1
        dab += float(stain_density(tissue, DAB, white).sum(dtype=np.float64))
    return NO_DAB_WARNING if eosin > dab else None


class _TileLog:
    """Tile records of one slide, one JSON line each after a header with the parameters hash."""

    def __init__(self, path: Path, phash: str) -> None:
        self.path = path
        self.phash = phash

    def load(self) -> dict[tuple[int, int], TileRecord]:
        records: dict[tuple[int, int], TileRecord] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if not lines or json.loads(lines[0]).get("params") != self.phash:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"params": self.phash}) + "\n")
            return records
        for line in lines[1:]:
            try:  # a line cut short by a kill is measured again
                rec = TileRecord.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue
            records[(rec.x0, rec.y0)] = rec
        return records

    @contextlib.contextmanager
    def appending(self) -> Iterator[Callable[[list[TileRecord]], None]]:
        """A function appending a batch of records, the file opened once for all of them (an
        open per tile cost more than some tiles' measurements); each batch is flushed whole."""
        with self.path.open("a") as f:
            def append(recs: list[TileRecord]) -> None:
                f.write("".join(json.dumps(r.to_json()) + "\n" for r in recs))
                f.flush()

            yield append
