"""The work of `translate` that may run away from the driver: on a Dask worker, or in process.

A slide's tissue tiles are cut into shards (tile ranges); a shard reads its tiles on threads
ahead of the model, translates them and writes each finished tile to the slide's tile store on a
thread pool (a zarr chunk write costs ~6 ms, which must not stall the device). A chunk is written
under a temporary name and renamed, so a shard re-run after its worker died writes only the tiles
the store still lacks. Nothing here touches the manifest: results go back to the driver, which
alone writes it. Tasks and results are picklable plain data; the engine is loaded once per process
and kept, keyed by its card and options (device included).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl import heap
from stainctl.cluster.pin import io_threads
from stainctl.engines.base import EngineOptions, EngineShape, tile_seed
from stainctl.errors import SlideError
from stainctl.slide.tiles import TileSource

if TYPE_CHECKING:
    from stainctl.engines.base import Engine
    from stainctl.workspace.tilestore import TileStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineKey:
    """Which engine a worker loads (and keeps): the card, where its weights are, how to run."""

    marker: str  # a card name
    models_dir: str
    options: EngineOptions


@dataclass(frozen=True, kw_only=True)
class GlassTask:
    """Measure the colour the model gives one slide's glass (stitch fills glass with it)."""

    slide_id: int
    engine: EngineKey
    source: TileSource
    # Level-0 top-left of the glass tile (context included), or None: translate `uniform`.
    at: tuple[int, int] | None
    uniform: tuple[int, int, int]
    margin: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """A range of one slide's tiles to translate into its store."""

    slide_id: int
    slide_key: str
    shard: int  # index among the slide's shards
    engine: EngineKey
    source: TileSource
    store: str
    margin0: float  # context on each side, level-0 px
    tiles: NDArray[np.int64]  # (n, 4): col, row, level-0 x, y of the grid tile
    seed: int
    batch_size: int
    readers: int
    # Threads writing finished tiles; None: as many as the worker's cores allow (io_threads),
    # counted where the shard runs, not on the driver that made the task.
    writers: int | None = None


@dataclass(frozen=True, kw_only=True)
class WorkResult:
    """What a task gives back: an error is a sentence for the slide's failure, never raised."""

    slide_id: int
    shard: int = -1  # -1: a glass task
    tiles: int = 0  # translated now
    seconds: float = 0.0
    colour: tuple[int, int, int] | None = None
    error: str | None = None
    worker: str = field(default="")


@functools.lru_cache(maxsize=2)
def cached_engine(key: EngineKey) -> Engine:
    """One engine per process and (card, options): a worker keeps it across slides and shards."""
    from stainctl.engines.base import load_engine
    from stainctl.models.lookup import marker_card

    directory = Path(key.models_dir)
    return load_engine(marker_card(key.marker, directory), directory, key.options)


def engine_shape(key: EngineKey) -> EngineShape:
    """Runs on a worker: the shape of the engine it loads (and keeps) for `key`."""
    return EngineShape.of(cached_engine(key))


def measure_glass(task: GlassTask) -> WorkResult:
    """Runs on a worker: the glass colour, or the reason it could not be measured."""
    try:
        if task.at is not None:
            tile = task.source.read(*task.at)
        else:
            side = task.source.tile_size
            tile = np.full((side, side, 3), task.uniform, np.uint8)
        from stainctl.steps.glass import glass_median

        colour = glass_median(cached_engine(task.engine), tile, task.seed, task.margin)
        return WorkResult(slide_id=task.slide_id, colour=colour, worker=_worker())
    except Exception as err:  # reported to the driver, which fails this slide only
        return WorkResult(slide_id=task.slide_id, error=worker_reason(err, task.source.path),
                          worker=_worker())


def run_shard(task: ShardTask) -> WorkResult:
    """Runs on a worker: translate the shard's tiles the store still lacks."""
    from stainctl.workspace.tilestore import TileStore

    t0 = time.perf_counter()
    try:
        store = TileStore.open(task.store)
        n = translate_tiles(cached_engine(task.engine), task.source, store, task.tiles,
                            present=present(Path(task.store), task.tiles),
                            slide_key=task.slide_key, margin0=task.margin0, seed=task.seed,
                            batch_size=task.batch_size, readers=task.readers,
                            writers=task.writers)
    except Exception as err:  # reported to the driver, which fails this slide only
        return WorkResult(slide_id=task.slide_id, shard=task.shard,
                          error=worker_reason(err, task.source.path), worker=_worker())
    return WorkResult(slide_id=task.slide_id, shard=task.shard, tiles=n,
                      seconds=time.perf_counter() - t0, worker=_worker())


def translate_tiles(engine: Engine, source: TileSource, store: TileStore,
                    tiles: NDArray[np.int64], *, present: NDArray[np.bool_], slide_key: str,
                    margin0: float, seed: int, batch_size: int, readers: int,
                    writers: int | None = None,
                    advance: Callable[[int], None] | None = None) -> int:
    """Translate `tiles` ((n, 4): col, row, level-0 x, y) into `store`, all but those `present`
    already: read on `readers` threads sharing each batch (at most two batches ahead), write on
    `writers` threads (None: `io_threads()`, this process's cores; a chunk costs ~6 ms of
    compression and a rename, so a GPU at hundreds of tiles/s needs several). The same code in
    process and on a worker. Batches are always the same runs of `batch_size` tiles from the
    start of `tiles` (a batch with some tiles present is translated whole, and only the missing
    ones are written): a network's pixels depend on the batch a tile is in (by one grey level on
    CPU), so a resumed or re-run shard gives exactly the uninterrupted run's tiles. Returns the
    number of tiles written."""
    from stainctl.slide.tiles import read_batches

    starts = [i for i in range(0, len(tiles), batch_size)
              if not present[i:i + batch_size].all()]
    if not starts:
        return 0
    pick = np.concatenate([np.arange(i, min(i + batch_size, len(tiles))) for i in starts])
    coords = np.round(tiles[pick, 2:] - margin0).astype(np.int64)
    done = 0
    writers = writers or io_threads()
    with ThreadPoolExecutor(writers, thread_name_prefix="tile-writer") as pool:
        pending: list[Future[None]] = []
        for start, batch in zip(starts, read_batches(source, coords, batch_size, readers),
                                strict=True):
            cells = tiles[start:start + len(batch), :2]
            seeds = [tile_seed(seed, slide_key, int(c), int(r)) for c, r in cells]
            out = engine.translate(batch, seeds)
            missing = ~present[start:start + len(batch)]
            pending.extend(pool.submit(store.write, int(col), int(row), tile)
                           for (col, row), tile, m in zip(cells, out, missing, strict=True)
                           if m)
            done += int(missing.sum())
            # Bound the tiles held in memory (two batches' worth, not a multiple of the writers:
            # 1,024 tiles, ~1 GB, at a GPU's 64-tile batches), and raise a failed write early.
            pending = _drain(pending, keep=max(2 * batch_size, 4 * writers))
            heap.trim()  # what the batch freed goes back: RSS flat with the slide area
            if advance is not None:
                advance(int(missing.sum()))
        _drain(pending, keep=0)
    return done


def shards(tiles: NDArray[np.int64], size: int) -> Iterator[NDArray[np.int64]]:
    """`tiles` in ranges of `size`."""
    for i in range(0, len(tiles), size):
        yield tiles[i:i + size]


def worker_reason(err: Exception, path: str) -> str:
    """A failed task's reason in a line; a slide the worker cannot see says so."""
    from stainctl.steps.report import unexpected

    if not os.path.exists(path):
        return (f"the worker {_worker() or 'process'} cannot see {path}; every worker must "
                "reach the slides at the same path as this machine (a shared file system)")
    if isinstance(err, SlideError):
        return err.reason
    return unexpected(err)


def present(store: Path, tiles: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Which of `tiles` the store already holds (from its chunk files: true after any crash;
    a re-run shard keeps them)."""
    from stainctl.workspace.tilestore import chunk_file

    return np.fromiter((chunk_file(store, int(c), int(r)).exists() for c, r in tiles[:, :2]),
                       bool, len(tiles))


def _drain(pending: list[Future[None]], keep: int) -> list[Future[None]]:
    while len(pending) > keep:
        pending.pop(0).result()
    return pending


def _worker() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return ""
