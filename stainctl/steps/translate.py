"""`translate`: every tissue tile through a marker model, into the slide's tile store.

Tiles are read with the model's context margin on each side; the generated tiles (margin
included) go to WS/slides/<slide>/translated/<model>.zarr, which `stitch` blends. A killed run
resumes with the tiles the store lacks. All tissue tiles are translated, also those the quality
filter rejected: the filter chooses tiles for training and evaluation, while a virtual slide must
cover all of its tissue. Glass tiles are left to `stitch`, which fills them with the colour this
model gives the slide's glass, measured once per slide and model (`glass.py`) and kept in the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.base import (
    Engine,
    EngineOptions,
    engine_spec,
    load_engine,
    tile_seed,
)
from stainctl.errors import SlideError, UsageError
from stainctl.models.card import ModelCard
from stainctl.steps.report import (
    BatchResult,
    Progress,
    SilentProgress,
    SlideOutcome,
    params_hash,
    unexpected,
)
from stainctl.workspace import Workspace

log = logging.getLogger(__name__)
MPP_TOLERANCE = 0.1


@dataclass(frozen=True)
class TranslateOptions:
    marker: str  # a marker model's name, or a stain (ki67, ck7...) with an installed model
    models_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 8
    readers: int = 2
    force: bool = False
    # Diffusion engines (pixcell): sampling, and the seed each tile's noise is derived from.
    steps: int = 20
    guidance: float = 1.2
    seed: int = 0
    dtype: str = "auto"
    overlap: int | None = None  # context px each side; default: the model card's margin

    def engine_options(self) -> EngineOptions:
        return EngineOptions(device=self.device, dtype=self.dtype, steps=self.steps,
                             guidance=self.guidance)


def grid_tile_size(card: ModelCard, options: TranslateOptions) -> int:
    """The tile size to tile a slide at for `card` (its engine decides how context is added)."""
    return engine_spec(card).grid_tile_size(card, options.overlap)


def marker_model(marker: str, directory: Path) -> ModelCard:
    """The card for `--marker`: a model of that name, or the installed model for that stain."""
    from stainctl.models.lookup import marker_card

    return marker_card(marker, directory)


def translate_slides(ws: Workspace, options: TranslateOptions,
                     progress: Progress | None = None) -> BatchResult:
    from stainctl.models.registry import models_dir

    progress = progress or SilentProgress()
    if options.batch_size < 1 or options.readers < 1:
        raise UsageError("--batch-size and --readers must be at least 1")
    directory = models_dir(options.models_dir)
    card = marker_model(options.marker, directory)
    engine = load_engine(card, directory, options.engine_options())
    m = ws.manifest
    ready = m.slides_done("filter")
    if not ready:
        raise UsageError(f"nothing to translate in {ws.root}: no slide has been filtered; run "
                         "`stainctl filter -w WS` first")
    result = BatchResult("translate")
    todo = sum(int(m.tile_counts(s["id"])["tiles_tissue"]) for s in ready)
    progress.start("translate", todo)
    for s in ready:
        try:
            outcome = _translate_one(ws, s, card, engine, options, progress)
        except Exception as err:  # one bad slide must not stop the batch
            reason = (err.reason if isinstance(err, SlideError)
                      else unexpected(err, ws.slide_dir(s["key"])))
            log.debug("%s failed", s["path"], exc_info=not isinstance(err, SlideError))
            m.set_step(s["id"], f"translate:{card.name}", "failed", error=reason,
                       run_id=ws.run_id)
            outcome = SlideOutcome(s["key"], s["path"], "failed", reason)
        result.slides.append(outcome)
        progress.log(f"{outcome.slide}: {outcome.state} ({outcome.message})")
    engine.close()
    return result


def _translate_one(ws: Workspace, s: Any, card: ModelCard, engine: Engine,
                   options: TranslateOptions,
                   progress: Progress) -> SlideOutcome:
    from stainctl.slide.tiles import TileSource, read_batches
    from stainctl.steps.glass import glass_colour
    from stainctl.workspace.tilestore import TileStore, create_for_slide

    m = ws.manifest
    grid = m.grid(s["id"])
    assert grid is not None
    if abs(grid["target_mpp"] - card.input_mpp) > MPP_TOLERANCE * card.input_mpp:
        raise SlideError(s["path"], f"tiles are at {grid['target_mpp']} µm/px but {card.name} "
                         f"takes {card.input_mpp} µm/px; re-tile with --target-mpp "
                         f"{card.input_mpp}")
    margin = _margin(s["path"], int(grid["tile_size"]), card, engine, options)
    side = int(grid["tile_size"]) + 2 * margin
    if side % engine.multiple:
        raise SlideError(s["path"], f"{card.name} needs tiles of a multiple of "
                         f"{engine.multiple} px; re-tile with --tile-size {card.tile_size}")
    step = f"translate:{card.name}"
    params: dict[str, Any] = {
        "model": card.name, "margin": margin, "grid": grid["params_hash"],
        "filter": (m.step(s["id"], "filter") or {"params_hash": None})["params_hash"],
        "background": "the model's glass"}  # was a fixed near-white: such stores are redone
    params.update(engine.settings())  # what changes the pixels; batching and device do not
    if not engine.deterministic:
        params["seed"] = options.seed
    phash = params_hash(params)
    path = ws.tile_store_path(s["key"], card.name)
    done = m.step(s["id"], step)
    if options.force or (done is not None and done["params_hash"] != phash):
        TileStore.remove(path)  # made with other settings: start again
    elif done is not None and done["state"] == "done" and path.exists():
        return SlideOutcome(s["key"], s["path"], "skipped", "already translated",
                            {"store": str(path)})
    m.set_step(s["id"], step, "running", params_hash=phash, params=params, run_id=ws.run_id)
    scale = float(grid["extent0"]) / float(grid["tile_size"])  # level-0 px per output px
    margin0 = margin * scale
    source = TileSource(s["path"], float(grid["extent0"]) + 2 * margin0, side)
    background = _resumed_background(path) or glass_colour(
        ws, s, grid, engine, source, margin, tile_seed(options.seed, s["key"], -1, -1))
    store = create_for_slide(ws, s, card.name, margin,
                             {"model": card.name, "background": list(background)})
    todo = np.asarray(m.db.execute(
        "SELECT col, row, x, y FROM tiles WHERE slide_id=? AND in_tissue=1 ORDER BY row, col",
        (s["id"],)).fetchall(), np.int64).reshape(-1, 4)
    written = store.written()
    todo = todo[~written[todo[:, 1], todo[:, 0]]]  # resume: only what the store lacks
    coords = np.round(todo[:, 2:] - margin0).astype(np.int64)
    start = 0
    for batch in read_batches(source, coords, options.batch_size, options.readers):
        cells = todo[start:start + len(batch), :2]
        seeds = [tile_seed(options.seed, s["key"], int(c), int(r)) for c, r in cells]
        out = engine.translate(batch, seeds)
        for (col, row), tile in zip(cells, out, strict=True):
            store.write(int(col), int(row), tile)
        start += len(batch)
        progress.advance(len(batch))
    store.finish()
    m.record_artifact(s["id"], "tile_store", ws.relative(path), phash)
    m.set_step(s["id"], step, "done", params_hash=phash, params=params, run_id=ws.run_id)
    total = int(store.written().sum())
    return SlideOutcome(s["key"], s["path"], "done",
                        f"{len(todo)} tile(s) translated ({total} in the store)",
                        {"store": str(path), "translated_now": len(todo), "tiles": total})


def _resumed_background(path: Path) -> tuple[int, int, int] | None:
    """The glass colour an interrupted run already measured into its store (measuring again
    could differ by a rounding step on other kernels, and the store would not reopen)."""
    from stainctl.workspace.tilestore import StoreError, TileStore

    if not path.exists():
        return None
    try:
        colour = TileStore.open(path, writable=False).meta.get("background")
    except StoreError:
        return None
    return (int(colour[0]), int(colour[1]), int(colour[2])) if colour else None


def _margin(path: str, tile_size: int, card: ModelCard, engine: Engine,
            options: TranslateOptions) -> int:
    """Context px on each side of a grid tile: fixed by the grid for a fixed-size generator,
    else --overlap or the card's margin."""
    side = engine.input_side
    if side is None:
        return int(options.overlap if options.overlap is not None else engine.margin)
    margin, odd = divmod(side - tile_size, 2)
    if margin < 0 or odd or (options.overlap is not None and margin != options.overlap):
        overlap = engine.margin if options.overlap is None else options.overlap
        raise SlideError(path, f"{card.name} generates {side}-px tiles; with a {overlap}-px "
                         f"overlap, tile at --tile-size {side - 2 * overlap} (this workspace "
                         f"has {tile_size}-px tiles)")
    return margin
