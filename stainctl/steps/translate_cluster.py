"""`translate` on a Dask cluster: the driver side.

The driver loads no model: a worker, which loads the engine for its tasks anyway, sends its
shape (margin, settings) for planning. Per slide, a worker first measures the colour the model
gives the slide's glass (the driver reads no slide pixels, so a slide a worker cannot see fails
with that reason); the driver then creates the tile store, cuts the slide's tissue tiles into
shards of whole batches and submits those the store does not hold yet. A shard whose worker dies
is re-run by Dask on another worker and writes only the tiles still missing. Results come back
to this process, which alone writes the manifest: a slide is done when all its shards are,
failed (with the first shard's reason) when one fails; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.engines.base import EngineShape, tile_seed
from stainctl.errors import StainctlError
from stainctl.steps.lifecycle import Failure, SlidePlan
from stainctl.steps.report import SlideOutcome, unexpected
from stainctl.steps.translate_work import (
    EngineKey,
    GlassTask,
    ShardTask,
    WorkResult,
    engine_shape,
    measure_glass,
    run_shard,
    shards,
)
from stainctl.workspace import SlideRecord
from stainctl.workspace.manifest import ManifestDamaged

if TYPE_CHECKING:
    from distributed import Client

    from stainctl.steps.translate import TranslateOptions, TranslateStep, TranslateWork

    Plan = SlidePlan[SlideRecord, TranslateWork]

log = logging.getLogger(__name__)


@dataclass
class _Slide:
    """The driver's view of one slide in flight."""

    plan: Plan
    shards: int = 0  # submitted
    back: int = 0  # returned
    tiles: int = 0
    started: float = field(default_factory=time.perf_counter)
    error: str | None = None


@contextmanager
def cluster_client(options: TranslateOptions) -> Iterator[Client]:
    """A client of --scheduler's cluster, or of a local one started for --devices."""
    from stainctl.cluster.connect import connect
    from stainctl.cluster.local import local_cluster

    if options.scheduler:
        with connect(options.scheduler) as client:
            yield client
        return
    assert options.devices is not None
    with local_cluster(options.devices) as address, connect(address) as client:
        yield client


def engine_key(step: TranslateStep) -> EngineKey:
    """The engine each worker loads: on --devices workers, the device each sees."""
    from stainctl.models.registry import models_dir

    options = step.options
    engine = options.engine_options()
    if options.devices:
        engine = dataclasses.replace(engine, device=options.devices.worker_device)
    directory = step.directory or models_dir(options.models_dir)
    return EngineKey(marker=step.card.name, models_dir=str(directory), options=engine)


def worker_shape(client: Client, key: EngineKey) -> EngineShape:
    """The engine's shape (margin, settings...) from a worker, which loads the engine and keeps
    it for its tasks: the driver plans slides without loading the model itself."""
    try:
        shape: EngineShape = client.submit(engine_shape, key, pure=False).result()
    except StainctlError:
        raise  # the worker's own clear error (a missing or bad model: exit 2)
    except Exception as err:  # every slide needs the model: the batch stops with the reason
        # Not a usage error: a worker that died or ran out of memory may do better on a rerun.
        raise StainctlError(f"a worker could not load {key.marker} ({type(err).__name__}: "
                            f"{err}); see the workers' logs, then run again") from err
    return shape


def shard_size(options: TranslateOptions, batch_size: int) -> int:
    """--shard-tiles rounded up to whole batches: a shard's batches are the in-process run's."""
    return -(-options.shard_tiles // batch_size) * batch_size


def run_on_cluster(step: TranslateStep, plans: Iterator[Plan]
                   ) -> Iterator[tuple[Plan, SlideOutcome | Failure]]:
    from distributed import as_completed

    from stainctl.steps.glass import glass_spot
    from stainctl.steps.translate import _resumed_background

    options = step.options
    key = engine_key(step)
    slides: dict[int, _Slide] = {}
    owner: dict[Hashable, int] = {}  # future key -> slide id
    with cluster_client(options) as client:
        if step.shape is None:
            step.shape = worker_shape(client, key)
        queue = as_completed([], loop=client.loop)

        def submit_shards(state: _Slide, background: tuple[int, int, int]
                          ) -> SlideOutcome | None:
            """Create the store and submit its shards; the outcome when nothing is left."""
            plan = state.plan
            _, tiles, present = step.open_store(plan, background)
            size = shard_size(options, step.batch_size)
            for i, part in enumerate(shards(tiles, size)):
                if present[i * size:(i + 1) * size].all():
                    continue  # written by an earlier run
                fut = client.submit(run_shard, _shard(step, plan, key, i, part), pure=False)
                owner[fut.key] = plan.slide.id
                queue.add(fut)
                state.shards += 1
            return None if state.shards else step.finished(plan, 0, 0.0)

        for plan in plans:
            state = _Slide(plan)
            slides[plan.slide.id] = state
            try:
                background = _resumed_background(plan.work.store)
                if background is not None:
                    done = submit_shards(state, background)
                    if done is not None:
                        yield plan, done
                    continue
                work = plan.work
                at, uniform = glass_spot(step.ws, plan.slide, work.grid, work.margin)
                fut = client.submit(measure_glass, GlassTask(
                    slide_id=plan.slide.id, engine=key, source=step.source(work), at=at,
                    uniform=uniform, margin=work.margin,
                    seed=tile_seed(options.seed, plan.slide.key, -1, -1)), pure=False)
                owner[fut.key] = plan.slide.id
                queue.add(fut)
            except ManifestDamaged:
                raise  # the workspace's fault: every slide would fail so
            except Exception as err:  # this slide only
                yield plan, Failure.of(err, plan.slide.path, step.where(plan.item))

        for fut in queue:
            state = slides[owner.pop(fut.key)]
            plan = state.plan
            try:
                res: WorkResult = fut.result()
            except Exception as err:  # a task that killed its workers too often (KilledWorker)
                res = WorkResult(slide_id=plan.slide.id, shard=0,
                                 error=f"a worker running it died: {unexpected(err)}")
            fut.release()
            if res.shard < 0:  # the glass colour: now the tiles
                if res.error is not None or res.colour is None:
                    yield plan, Failure(res.error or "no glass colour came back")
                    continue
                try:
                    done = submit_shards(state, res.colour)
                except ManifestDamaged:
                    raise
                except Exception as err:
                    yield plan, Failure.of(err, plan.slide.path, step.where(plan.item))
                    continue
                if done is not None:
                    yield plan, done
                continue
            state.back += 1
            state.tiles += res.tiles
            # A slow or failing worker shows in the debug log (`-v`) by its name.
            log.debug("%s shard %d: %d tiles in %.1f s on worker %s", plan.slide.key, res.shard,
                      res.tiles, res.seconds, res.worker or "?")
            step.progress.advance(res.tiles)
            if res.error is not None and state.error is None:
                state.error = res.error
            if state.back < state.shards:
                continue
            if state.error is not None:
                yield plan, Failure(state.error)
            else:
                yield plan, step.finished(plan, state.tiles, time.perf_counter() - state.started)


def _shard(step: TranslateStep, plan: Plan, key: EngineKey, index: int,
           tiles: NDArray[np.int64]) -> ShardTask:
    options, work = step.options, plan.work
    return ShardTask(slide_id=plan.slide.id, slide_key=plan.slide.key, shard=index, engine=key,
                     source=step.source(work), store=str(work.store),
                     margin0=step.margin0(work), tiles=np.ascontiguousarray(tiles),
                     seed=options.seed, batch_size=step.batch_size, readers=step.readers)
