"""Measure tiles in parallel with Dask: local threads, or an existing distributed cluster.

Workers read tiles and return metrics; the driver alone writes the manifest. Results stream back
batch by batch so the driver can commit them as they come (a killed run loses one wave at most).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stainctl.errors import SlideError
from stainctl.quality.metrics import tile_metrics
from stainctl.slide.tiles import TileSource


@dataclass(frozen=True)
class MeasureTask:
    slide_id: int
    source: TileSource
    tiles: np.ndarray  # (n, 3) int64: tile id, level-0 x, level-0 y


@dataclass(frozen=True)
class MeasureResult:
    slide_id: int
    metrics: np.ndarray | None  # (n, 4): tile id, laplacian var, saturated frac, white frac
    error: str | None = None


def measure(task: MeasureTask) -> MeasureResult:
    """Runs on a worker. A slide that cannot be read gives an error result, not an exception."""
    out = np.empty((len(task.tiles), 4), np.float64)
    try:
        for i, (tid, x, y) in enumerate(task.tiles):
            out[i, 0] = tid
            out[i, 1:] = tile_metrics(task.source.read(int(x), int(y)))
    except SlideError as err:
        return MeasureResult(task.slide_id, None, err.reason)
    except Exception as err:  # a worker must report, never die, on bad pixels
        return MeasureResult(task.slide_id, None, f"{type(err).__name__}: {err}")
    return MeasureResult(task.slide_id, out)


def run(tasks: list[MeasureTask], scheduler: str | None = None,
        workers: int | None = None) -> Iterator[MeasureResult]:
    """Yield results as they finish. `scheduler`: None for local threads, else a Dask
    distributed scheduler address (tcp://host:8786)."""
    if not tasks:
        return
    if scheduler:
        yield from _run_distributed(tasks, scheduler)
    else:
        yield from _run_threads(tasks, workers or os.cpu_count() or 1)


def _run_threads(tasks: list[MeasureTask], workers: int) -> Iterator[MeasureResult]:
    import dask

    # Waves of a few tasks per thread keep the scheduler busy and let results stream back.
    wave = workers * 4
    for start in range(0, len(tasks), wave):
        parts = [dask.delayed(measure, pure=False)(t) for t in tasks[start:start + wave]]
        yield from dask.compute(*parts, scheduler="threads", num_workers=workers)


def _run_distributed(tasks: list[MeasureTask], address: str) -> Iterator[MeasureResult]:
    from distributed import as_completed

    from stainctl.cluster.connect import connect

    with connect(address) as client:
        futures = client.map(measure, tasks, pure=False)
        for fut in as_completed(futures, loop=client.loop):
            yield fut.result()
