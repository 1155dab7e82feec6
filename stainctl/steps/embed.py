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
from typing import Any

import numpy as np

from stainctl.errors import ModelError, SlideError, UsageError
from stainctl.steps.report import (
    BatchResult,
    Progress,
    SilentProgress,
    SlideOutcome,
    params_hash,
    unexpected,
)
from stainctl.workspace import Workspace, atomic_path

log = logging.getLogger(__name__)
MPP_TOLERANCE = 0.1  # a grid within 10 % of the encoder's resolution is used as it is


@dataclass(frozen=True)
class EmbedOptions:
    encoder: str = "uni2-h"
    models_dir: Path | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "fp32"
    scheduler: str | None = None  # Dask distributed address: slides spread over its workers
    readers: int = 2  # threads reading tiles ahead of the network
    force: bool = False


@dataclass(frozen=True)
class EmbedJob:
    """One slide's work: picklable, so a Dask worker can run it."""

    slide_id: int
    key: str
    slide_path: str
    extent0: float
    tile_size: int
    tiles: np.ndarray  # (N, 3) int64: manifest id, level-0 x, y
    out_dir: str
    card: str  # as the user gave it: a model name or a card file
    name: str  # the card's name, which names the files
    models_dir: str
    device: str
    dtype: str
    batch_size: int
    readers: int

    @property
    def paths(self) -> tuple[Path, Path]:
        base = Path(self.out_dir)
        return base / f"{self.name}.npy", base / f"{self.name}.tiles.npy"


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
    if options.batch_size < 1 or options.readers < 1:
        raise UsageError("--batch-size and --readers must be at least 1")
    if options.dtype not in ("fp32", "bf16"):
        raise UsageError(f"--dtype must be fp32 or bf16, got {options.dtype}")
    directory = models_dir(options.models_dir)
    card = get_card(options.encoder, directory)
    if card.kind != "encoder":
        raise ModelError(f"{card.name} is a {card.kind} model; --encoder needs an encoder "
                         "(see `stainctl models list`)")
    weights = resolve(card, "encoder", directory)  # fail before any slide if missing
    m = ws.manifest
    ready = m.slides_done("filter")
    if not ready:
        raise UsageError(f"nothing to embed in {ws.root}: no slide has been filtered; run "
                         "`stainctl filter -w WS` first")

    step = f"embed:{card.name}"
    result = BatchResult("embed")
    jobs: list[tuple[Any, EmbedJob, str, dict[str, Any]]] = []
    for s in ready:
        try:
            job, phash, params = _plan(ws, s, card, options, directory, weights)
        except SlideError as err:
            m.set_step(s["id"], step, "failed", error=err.reason, run_id=ws.run_id)
            result.slides.append(SlideOutcome(s["key"], s["path"], "failed", err.reason))
            continue
        done = m.step(s["id"], step)
        if (not options.force and done is not None and done["state"] == "done"
                and done["params_hash"] == phash and all(p.exists() for p in job.paths)):
            result.slides.append(SlideOutcome(s["key"], s["path"], "skipped",
                                              f"{len(job.tiles)} tiles already embedded"))
            continue
        m.set_step(s["id"], step, "running", params_hash=phash, params=params, run_id=ws.run_id)
        jobs.append((s, job, phash, params))

    progress.start("embed", sum(len(j.tiles) for _, j, _, _ in jobs))
    runner = _run_distributed if options.scheduler else _run_local
    by_id = {s["id"]: (s, job, phash, params) for s, job, phash, params in jobs}
    for res in runner([j for _, j, _, _ in jobs], options, progress):
        s, job, phash, params = by_id[res.slide_id]
        if res.error is None:
            for path, kind in zip(job.paths, ("embeddings", "embedding_tiles"), strict=True):
                m.record_artifact(s["id"], kind, ws.relative(path), phash)
            m.set_step(s["id"], step, "done", params_hash=phash, params=params,
                       run_id=ws.run_id)
            outcome = SlideOutcome(s["key"], s["path"], "done",
                                   f"{res.tiles} tiles -> {res.shape[1]} x {res.shape[2]} tokens",
                                   {"tiles": res.tiles, "shape": list(res.shape),
                                    "embeddings": str(job.paths[0])})
        else:
            m.set_step(s["id"], step, "failed", params_hash=phash, params=params,
                       error=res.error, run_id=ws.run_id)
            outcome = SlideOutcome(s["key"], s["path"], "failed", res.error)
        result.slides.append(outcome)
        progress.log(f"{outcome.slide}: {outcome.state} ({outcome.message})")
    return result


def _plan(ws: Workspace, s: Any, card: Any, options: EmbedOptions, directory: Path,
          weights: Path) -> tuple[EmbedJob, str, dict[str, Any]]:
    grid = ws.manifest.grid(s["id"])
    assert grid is not None
    if abs(grid["target_mpp"] - card.input_mpp) > MPP_TOLERANCE * card.input_mpp:
        raise SlideError(s["path"], f"tiles are at {grid['target_mpp']} µm/px but {card.name} "
                         f"takes {card.input_mpp} µm/px; re-tile with --target-mpp "
                         f"{card.input_mpp}")
    crop = int(card.architecture.get("crop", grid["tile_size"]))
    if grid["tile_size"] % crop:
        raise SlideError(s["path"], f"{card.name} cuts tiles into {crop}-px crops; re-tile with "
                         f"a --tile-size that is a multiple of {crop} (e.g. {card.tile_size})")
    tiles = np.asarray(ws.manifest.db.execute(
        "SELECT id, x, y FROM tiles WHERE slide_id=? AND keep=1 ORDER BY id",
        (s["id"],)).fetchall(), np.int64).reshape(-1, 3)
    if not len(tiles):
        raise SlideError(s["path"], "no tile was kept by the filter; lower its thresholds")
    filtered = ws.manifest.step(s["id"], "filter")
    params = {"encoder": card.name, "weights": str(weights), "dtype": options.dtype,
              "grid": grid["params_hash"], "tiles": len(tiles),
              "filter": filtered["params_hash"] if filtered else None}
    job = EmbedJob(s["id"], s["key"], s["path"], float(grid["extent0"]), int(grid["tile_size"]),
                   tiles, str(ws.slide_dir(s["key"]) / "embeddings"), options.encoder,
                   card.name, str(directory), options.device, options.dtype,
                   options.batch_size, options.readers)
    return job, params_hash(params), params


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
    from distributed import Client, as_completed

    with Client(options.scheduler, timeout="30s") as client:
        futures = [client.submit(run_job, job, pure=False) for job in jobs]
        for fut in as_completed(futures):
            res: JobResult = fut.result()
            progress.advance(res.tiles)
            yield res


@functools.lru_cache(maxsize=2)
def _encoder(card: str, models_dir: str, device: str, dtype: str) -> Any:
    """One network per process (a Dask worker keeps it across slides)."""
    from stainctl.models.encoders import load_encoder
    from stainctl.models.registry import get_card

    directory = Path(models_dir)
    return load_encoder(get_card(card, directory), directory, device=device, dtype=dtype)


def run_job(job: EmbedJob, encoder: Any = None,
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


def embed_to_files(job: EmbedJob, encoder: Any, advance: Callable[[int], None]
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
