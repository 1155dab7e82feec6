"""`translate`: every tissue tile through a marker model, into the slide's tile store.

Tiles are read with the model's context margin on each side; the generated tiles (margin
included) go to WS/slides/<slide>/translated/<model>.zarr, which `stitch` blends. A killed run
resumes with the tiles the store lacks. All tissue tiles are translated, also those the quality
filter rejected: the filter chooses tiles for training and evaluation, while a virtual slide must
cover all of its tissue. Glass tiles are left to `stitch`, which fills them with the colour this
model gives the slide's glass, measured once per slide and model (`glass.py`) and kept in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from stainctl.steps.lifecycle import SlidePlan, SlideStep
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.workspace import GridRecord, SlideRecord, StepRecord, Workspace


@dataclass(frozen=True, kw_only=True)
class TranslateOptions:
    marker: str  # a marker model's name, or a stain (ki67, ck7...) with an installed model
    models_dir: Path | None = None
    device: str = "auto"
    batch_size: int = 8
    readers: int = 2
    force: bool = False
    # Diffusion engines (pixcell, histdist): sampling, and the seed each tile's noise is derived
    # from; steps None: the engine's default (pixcell 20, histdist 100).
    steps: int | None = None
    guidance: float = 1.2
    seed: int = 0
    dtype: str = "auto"
    overlap: int | None = None  # context px each side; default: the model card's margin
    sampler: str = "dpm++"  # diffusion solver (engines.base.SAMPLERS)
    # Inversion (histdist; pixcell --structure): see engines.base.EngineOptions.
    inversion_steps: int | None = None
    eta: str | None = None
    inversion_eta: str = "zero"
    prediction: str | None = None
    latent_norm: str = "inversion"
    structure: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.readers < 1:
            raise UsageError("--batch-size and --readers must be at least 1")
        self.engine_options()  # EngineOptions checks --steps, --dtype and --sampler

    def engine_options(self) -> EngineOptions:
        return EngineOptions(device=self.device, dtype=self.dtype, steps=self.steps,
                             guidance=self.guidance, sampler=self.sampler,
                             inversion_steps=self.inversion_steps, eta=self.eta,
                             inversion_eta=self.inversion_eta, prediction=self.prediction,
                             latent_norm=self.latent_norm, structure=self.structure)


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
    directory = models_dir(options.models_dir)
    card = marker_model(options.marker, directory)
    engine = load_engine(card, directory, options.engine_options())
    try:  # whatever happens once it is loaded (nothing to translate, a stop): close it
        m = ws.manifest
        ready = m.slides_done(Workspace.FILTER)
        if not ready:
            raise UsageError(f"nothing to translate in {ws.root}: no slide has been filtered; "
                             "run `stainctl filter -w WS` first")
        progress.start("translate", sum(m.tile_counts(s.id)["tiles_tissue"] for s in ready))
        return TranslateStep(ws, progress, options, card, engine).run(ready)
    finally:
        engine.close()


@dataclass(frozen=True)
class TranslateWork:
    grid: GridRecord
    margin: int  # context px on each side of a grid tile
    side: int  # the generated tile: grid tile plus margins
    store: Path


class TranslateStep(SlideStep[SlideRecord, TranslateWork]):
    label = "translate"

    def __init__(self, ws: Workspace, progress: Progress, options: TranslateOptions,
                 card: ModelCard, engine: Engine) -> None:
        super().__init__(ws, progress, force=options.force)
        self.options, self.card, self.engine = options, card, engine

    def slide(self, item: SlideRecord) -> SlideRecord:
        return item

    def step_name(self, item: SlideRecord) -> str:
        return Workspace.translate_step(self.card.name)

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, TranslateWork]:
        card, options, m = self.card, self.options, self.manifest
        grid = self.model_grid(slide, card)
        margin = _margin(slide.path, grid.tile_size, card, self.engine, options)
        side = grid.tile_size + 2 * margin
        if side % self.engine.multiple:
            raise SlideError(slide.path, f"{card.name} needs tiles of a multiple of "
                             f"{self.engine.multiple} px; re-tile with --tile-size "
                             f"{card.tile_size}")
        filtered = m.step(slide.id, Workspace.FILTER)
        params: dict[str, object] = {
            "model": card.name, "margin": margin, "grid": grid.params_hash,
            "filter": filtered.params_hash if filtered else None,
            "background": "the model's glass"}  # was a fixed near-white: such stores are redone
        params.update(self.engine.settings())  # what changes the pixels; batching and device
        if not self.engine.deterministic:  # do not
            params["seed"] = options.seed
        work = TranslateWork(grid, margin, side, self.ws.tile_store_path(slide.key, card.name))
        return SlidePlan(item=item, slide=slide, step=self.step_name(item), params=params,
                         work=work, previous=previous)

    def where(self, item: SlideRecord) -> Path:
        return self.ws.slide_dir(item.key)

    def up_to_date(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> bool:
        return plan.done_before and plan.work.store.exists()

    def skipped(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> SlideOutcome:
        return SlideOutcome(plan.slide.key, plan.slide.path, "skipped", "already translated",
                            {"store": str(plan.work.store)})

    def start(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> None:
        from stainctl.workspace.tilestore import TileStore

        previous = plan.previous
        if self.force or (previous is not None and previous.params_hash != plan.phash):
            TileStore.remove(plan.work.store)  # made with other settings: start again
        super().start(plan)

    def run_one(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> SlideOutcome:
        from stainctl.slide.tiles import TileSource, read_batches
        from stainctl.steps.glass import glass_colour
        from stainctl.workspace.tilestore import create_for_slide

        s, work, options = plan.slide, plan.work, self.options
        grid, margin, path = work.grid, work.margin, work.store
        scale = grid.extent0 / grid.tile_size  # level-0 px per output px
        margin0 = margin * scale
        source = TileSource(s.path, grid.extent0 + 2 * margin0, work.side)
        background = _resumed_background(path) or glass_colour(
            self.ws, s, grid, self.engine, source, margin, tile_seed(options.seed, s.key, -1, -1))
        store = create_for_slide(self.ws, s, self.card.name, margin,
                                 {"model": self.card.name, "background": list(background)})
        todo = np.asarray([(t.col, t.row, t.x, t.y) for t in self.manifest.tissue_tiles(s.id)],
                          np.int64).reshape(-1, 4)
        written = store.written()
        todo = todo[~written[todo[:, 1], todo[:, 0]]]  # resume: only what the store lacks
        coords = np.round(todo[:, 2:] - margin0).astype(np.int64)
        start = 0
        for batch in read_batches(source, coords, options.batch_size, options.readers):
            cells = todo[start:start + len(batch), :2]
            seeds = [tile_seed(options.seed, s.key, int(c), int(r)) for c, r in cells]
            out = self.engine.translate(batch, seeds)
            for (col, row), tile in zip(cells, out, strict=True):
                store.write(int(col), int(row), tile)
            start += len(batch)
            self.progress.advance(len(batch))
        store.finish()
        self.manifest.record_artifact(s.id, "tile_store", self.ws.relative(path), plan.phash)
        total = int(store.written().sum())
        return SlideOutcome(s.key, s.path, "done",
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
    if not isinstance(colour, list) or len(colour) != 3:
        return None
    r, g, b = (int(c) for c in colour)
    return r, g, b


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
