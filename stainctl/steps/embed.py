"""`embed`: foundation-model tokens of every kept tile, one float16 array per slide and encoder.

WS/slides/<slide>/embeddings/<encoder>.npy holds (kept tiles, tokens, dim) float16, row i for the
tile whose manifest id is row i of <encoder>.tiles.npy. Both are written under temporary names and
renamed, the ids first, so a killed run leaves the slide to be redone, never half an array.
Tiles are read on reader threads while the network runs on the previous batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import ModelError, SlideError, UsageError
from stainctl.steps.lifecycle import Failure, SlidePlan, SlideStep
from stainctl.steps.report import (
    BatchResult,
    Progress,
    SilentProgress,
    SlideOutcome,
    unexpected,
)
from stainctl.workspace import SlideRecord, StepRecord, Workspace, atomic_path

if TYPE_CHECKING:
    from stainctl.models.card import ModelCard
    from stainctl.models.encoders import TileEncoder

log = logging.getLogger(__name__)
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    encoder: str = "uni2-h"
    models_dir: Path | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "fp32"
    scheduler: str | None = None  # Dask distributed address: slides spread over its workers
    readers: int = 2  # threads reading tiles ahead of the network
    force: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.readers < 1:
            raise UsageError("--batch-size and --readers must be at least 1")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be fp32 or bf16, got {self.dtype}")


@dataclass(frozen=True)
class EmbedJob:
    """One slide's work: picklable, so a Dask worker can run it."""

    slide_id: int
    key: str
    slide_path: str
    extent0: float
    tile_size: int
    tiles: NDArray[np.int64]  # (N, 3): manifest id, level-0 x, y
    tokens_path: Path  # Workspace.embedding_files
    ids_path: Path
    card: str  # as the user gave it: a model name or a card file
    models_dir: str
    device: str
    dtype: str
    batch_size: int
    readers: int

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.tokens_path, self.ids_path


@dataclass
class JobResult:
    slide_id: int
    tiles: int = 0
    shape: tuple[int, ...] = ()
    error: str | None = None


def embed_slides(ws: Workspace, options: EmbedOptions,
                 progress: Progress | None = None) -> BatchResult:
    from stainctl.models.registry import get_card, models_dir
    from stainctl.models.weights import resolve

    progress = progress or SilentProgress()
    directory = models_dir(options.models_dir)
    card = get_card(options.encoder, directory)
    if card.kind != "encoder":
        raise ModelError(f"{card.name} is a {card.kind} model; --encoder needs an encoder "
                         "(see `stainctl models list`)")
    weights = resolve(card, "encoder", directory)  # fail before any slide if missing
    ready = ws.manifest.slides_done(Workspace.FILTER)
    if not ready:
        raise UsageError(f"nothing to embed in {ws.root}: no slide has been filtered; run "
                         "`stainctl filter -w WS` first")
    if options.scheduler:  # unreachable: say so before any slide is marked running
        from stainctl.cluster.connect import probe

        probe(options.scheduler)
    return EmbedStep(ws, progress, options, card, directory, weights).run(ready)


class EmbedStep(SlideStep[SlideRecord, EmbedJob]):
    label = "embed"

    def __init__(self, ws: Workspace, progress: Progress, options: EmbedOptions,
                 card: ModelCard, directory: Path, weights: Path) -> None:
        super().__init__(ws, progress, force=options.force)
        self.options, self.card, self.directory, self.weights = (options, card, directory,
                                                                 weights)

    def slide(self, item: SlideRecord) -> SlideRecord:
        return item

    def step_name(self, item: SlideRecord) -> str:
        return Workspace.embed_step(self.card.name)

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, EmbedJob]:
        card, options, m = self.card, self.options, self.manifest
        grid = self.model_grid(slide, card)
        crop = int(card.architecture.get("crop", grid.tile_size))
        if grid.tile_size % crop:
            raise SlideError(slide.path, f"{card.name} cuts tiles into {crop}-px crops; re-tile "
                             f"with a --tile-size that is a multiple of {crop} (e.g. "
                             f"{card.tile_size})")
        tiles = np.asarray([(t.id, t.x, t.y) for t in m.kept_tiles(slide.id)],
                           np.int64).reshape(-1, 3)
        if not len(tiles):
            raise SlideError(slide.path, "no tile was kept by the filter; lower its thresholds")
        filtered = m.step(slide.id, Workspace.FILTER)
        params = {"encoder": card.name, "weights": str(self.weights), "dtype": options.dtype,
                  "grid": grid.params_hash, "tiles": len(tiles),
                  "filter": filtered.params_hash if filtered else None}
        files = self.ws.embedding_files(slide.key, card.name)
        job = EmbedJob(slide.id, slide.key, slide.path, grid.extent0, grid.tile_size, tiles,
                       files.tokens, files.ids, options.encoder, str(self.directory),
                       options.device, options.dtype, options.batch_size, options.readers)
        return SlidePlan(item=item, slide=slide, step=self.step_name(item), params=params,
                         work=job, previous=previous)

    def up_to_date(self, plan: SlidePlan[SlideRecord, EmbedJob]) -> bool:
        return plan.done_before and all(p.exists() for p in plan.work.paths)

    def skipped(self, plan: SlidePlan[SlideRecord, EmbedJob]) -> SlideOutcome:
        return SlideOutcome(plan.slide.key, plan.slide.path, "skipped",
                            f"{len(plan.work.tiles)} tiles already embedded")

    def process(self, plans: Iterator[SlidePlan[SlideRecord, EmbedJob]]
                ) -> Iterator[tuple[SlidePlan[SlideRecord, EmbedJob], SlideOutcome | Failure]]:
        todo = list(plans)  # every slide planned first: the progress total, the Dask jobs
        self.progress.start("embed", sum(len(p.work.tiles) for p in todo))
        runner = _run_distributed if self.options.scheduler else _run_local
        by_id = {p.slide.id: p for p in todo}
        for res in runner([p.work for p in todo], self.options, self.progress):
            plan = by_id[res.slide_id]
            yield plan, self._outcome(plan, res)

    def run_one(self, plan: SlidePlan[SlideRecord, EmbedJob]) -> SlideOutcome:
        raise AssertionError("embed runs its jobs in process()")  # local or on Dask workers

    def _outcome(self, plan: SlidePlan[SlideRecord, EmbedJob],
                 res: JobResult) -> SlideOutcome | Failure:
        if res.error is not None:
            return Failure(res.error)
        job = plan.work
        for path, kind in zip(job.paths, ("embeddings", "embedding_tiles"), strict=True):
            self.manifest.record_artifact(job.slide_id, kind, self.ws.relative(path), plan.phash)
        return SlideOutcome(plan.slide.key, plan.slide.path, "done",
                            f"{res.tiles} tiles -> {res.shape[1]} x {res.shape[2]} tokens",
                            {"tiles": res.tiles, "shape": list(res.shape),
                             "embeddings": str(job.tokens_path)})


def _run_local(jobs: list[EmbedJob], options: EmbedOptions,
               progress: Progress) -> Iterator[JobResult]:
    # `options` is unused here; the signature matches _run_distributed, which needs it.
    encoder = None
    for job in jobs:
        if encoder is None:
            encoder = _encoder(job.card, job.models_dir, job.device, job.dtype)
        yield run_job(job, encoder, progress.advance)


def _run_distributed(jobs: list[EmbedJob], options: EmbedOptions,
                     progress: Progress) -> Iterator[JobResult]:
    from distributed import as_completed

    from stainctl.cluster.connect import connect

    assert options.scheduler is not None  # chosen for it
    with connect(options.scheduler) as client:
        futures = [client.submit(run_job, job, pure=False) for job in jobs]
        for fut in as_completed(futures, loop=client.loop):
            res: JobResult = fut.result()
            progress.advance(res.tiles)
            yield res


@functools.lru_cache(maxsize=2)
def _encoder(card: str, models_dir: str, device: str, dtype: str) -> TileEncoder:
    """One network per process (a Dask worker keeps it across slides)."""
    from stainctl.models.encoders import load_encoder
    from stainctl.models.registry import get_card

    directory = Path(models_dir)
    return load_encoder(get_card(card, directory), directory, device=device, dtype=dtype)


def run_job(job: EmbedJob, encoder: TileEncoder | None = None,
            advance: Callable[[int], None] | None = None) -> JobResult:
    """Embed one slide and write its files; errors come back in the result, for the driver."""
    try:
        encoder = encoder or _encoder(job.card, job.models_dir, job.device, job.dtype)
        shape = embed_to_files(job, encoder, advance or (lambda n: None))
        return JobResult(job.slide_id, len(job.tiles), shape)
    except SlideError as err:
        return JobResult(job.slide_id, error=err.reason)
    except Exception as err:  # the driver records it; the other slides go on
        log.debug("embedding %s failed", job.slide_path, exc_info=True)
        return JobResult(job.slide_id, error=unexpected(err))


def embed_to_files(job: EmbedJob, encoder: TileEncoder, advance: Callable[[int], None]
                    ) -> tuple[int, ...]:
    from stainctl.slide.tiles import TileSource, read_batches

    source = TileSource(job.slide_path, job.extent0, job.tile_size)
    n = len(job.tiles)
    shape = (n, encoder.tokens_per_tile(job.tile_size), encoder.dim)
    emb_path, ids_path = job.paths
    with atomic_path(ids_path) as tmp:
        np.save(tmp, job.tiles[:, 0])
    with atomic_path(emb_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        start = 0
        for batch in read_batches(source, job.tiles[:, 1:], job.batch_size, job.readers):
            out[start:start + len(batch)] = encoder.encode(batch, half=True).numpy()
            start += len(batch)
            advance(len(batch))
        out.flush()
        del out
    return shape
