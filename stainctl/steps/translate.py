"""`translate`: every tissue tile through a marker model, into the slide's tile store.

Tiles are read with the model's context margin on each side; the generated tiles (margin
included) go to WS/slides/<slide>/translated/<model>.zarr, which `stitch` blends. A killed run
resumes with the tiles the store lacks. All tissue tiles are translated, also those the quality
filter rejected: the filter chooses tiles for training and evaluation, while a virtual slide must
cover all of its tissue. Glass tiles are left to `stitch`, which fills them with the colour this
model gives the slide's glass, measured once per slide and model (`glass.py`) and kept in the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.engines.base import (
    Engine,
    EngineOptions,
    EngineShape,
    engine_spec,
    load_engine,
    tile_seed,
)
from stainctl.errors import SlideError, UsageError
from stainctl.models.card import ModelCard
from stainctl.steps.lifecycle import Failure, SlidePlan, SlideStep
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.workspace import GridRecord, SlideRecord, StepRecord, Workspace

if TYPE_CHECKING:
    from stainctl.cluster.local import Devices
    from stainctl.normalize.classical import Normaliser
    from stainctl.slide.tiles import TileSource
    from stainctl.workspace.tilestore import TileStore


@dataclass(frozen=True, kw_only=True)
class TranslateOptions:
    marker: str  # a marker model's name, or a stain (ki67, ck7...) with an installed model
    models_dir: Path | None = None
    device: str = "auto"
    # None: the engine's (EngineShape): 8 tiles and 2 readers on a CPU; on a GPU the engine's
    # batch (fast: 64) and up to 8 readers.
    batch_size: int | None = None
    readers: int | None = None
    force: bool = False
    # Diffusion engines (pixcell, histdist): sampling, and the seed each tile's noise is derived
    # from; steps None: the engine's default (pixcell 20, histdist 100).
    steps: int | None = None
    guidance: float = 1.2
    seed: int = 0
    dtype: str = "auto"
    overlap: int | None = None  # context px each side; default: the model card's margin
    sampler: str = "dpm++"  # diffusion solver (engines.base.SAMPLERS)
    # Where the work runs (cluster/): a Dask scheduler's address, or one local worker per
    # device (`cuda:0`, `cpu`), parsed and checked once (Devices.parse); neither: in this process.
    scheduler: str | None = None
    devices: Devices | None = None
    shard_tiles: int = 256  # tiles per task on a cluster; rounded up to whole batches
    # Tiles normalised to this reference (image or slide) before the model sees them; default:
    # the reference the model card names (architecture.normalize_to), if any.
    normalize_to: Path | None = None
    normalize_method: str = "macenko"  # a classical method (normalize.CLASSICAL)
    # Inversion (histdist; pixcell --structure): see engines.base.EngineOptions.
    inversion_steps: int | None = None
    eta: str | None = None
    inversion_eta: str = "zero"
    prediction: str | None = None
    latent_norm: str = "inversion"
    structure: float | None = None
    compile: str = "auto"  # torch.compile of the network (engines.base.COMPILE_MODES)

    def __post_init__(self) -> None:
        from stainctl.normalize import CLASSICAL

        given = [v for v in (self.batch_size, self.readers) if v is not None]
        if min([*given, self.shard_tiles]) < 1:
            raise UsageError("--batch-size, --readers and --shard-tiles must be at least 1")
        if self.scheduler and self.devices:
            raise UsageError("give --scheduler or --devices, not both: --devices starts its "
                             "own local cluster")
        if self.normalize_method not in CLASSICAL:
            raise UsageError(f"--normalize-method must be one of {', '.join(CLASSICAL)}, got "
                             f"{self.normalize_method}")
        self.engine_options()  # EngineOptions checks --steps, --dtype and --sampler

    @property
    def on_cluster(self) -> bool:
        return bool(self.scheduler or self.devices)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(device=self.device, dtype=self.dtype, steps=self.steps,
                             guidance=self.guidance, sampler=self.sampler,
                             inversion_steps=self.inversion_steps, eta=self.eta,
                             inversion_eta=self.inversion_eta, prediction=self.prediction,
                             latent_norm=self.latent_norm, structure=self.structure,
                             compile=self.compile)


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
    if options.scheduler:  # before loading a model: say at once that it cannot be reached
        from stainctl.cluster.connect import probe

        probe(options.scheduler)
    directory = models_dir(options.models_dir)
    card = marker_model(options.marker, directory)
    normaliser = input_normaliser(card, options)  # a bad reference stops before loading
    if normaliser is not None and options.on_cluster:
        # The per-slide fit and its colour table live in this process; workers do not get them.
        raise UsageError("input normalisation (--normalize-to, or the model card's reference) "
                         "runs in this process only: drop --scheduler/--devices for this run")
    if options.on_cluster:
        # Only the workers load the model (the driver learns its shape from one of them,
        # translate_cluster.py); here, missing weights are said before any slide is planned.
        from stainctl.models.registry import required_cards
        from stainctl.models.weights import check_installed

        check_installed(required_cards(card, directory), directory)
        engine = None
    else:
        engine = load_engine(card, directory, options.engine_options())
    try:  # whatever happens once it is loaded (nothing to translate, a stop): close it
        m = ws.manifest
        ready = m.slides_done(Workspace.FILTER)
        if not ready:
            raise UsageError(f"nothing to translate in {ws.root}: no slide has been filtered; "
                             "run `stainctl filter -w WS` first")
        progress.start("translate", sum(m.tile_counts(s.id)["tiles_tissue"] for s in ready))
        return TranslateStep(ws, progress, options, card, engine, directory,
                             normaliser).run(ready)
    finally:
        if engine is not None:
            engine.close()


def input_normaliser(card: ModelCard, options: TranslateOptions) -> Normaliser | None:
    """The normalisation of the model's input: --normalize-to, else the reference its card
    names (`normalize_to` in [architecture], relative to the card), else none."""
    reference = options.normalize_to
    named = card.architecture.get("normalize_to")
    if reference is None and named:
        reference = Path(str(named))
        if not reference.is_absolute() and card.origin is not None:
            reference = card.origin.parent / reference
    if reference is None:
        return None
    from stainctl.normalize.classical import Normaliser
    from stainctl.normalize.sample import load_reference

    method = options.normalize_method
    if options.normalize_to is None and card.architecture.get("normalize_method"):
        method = str(card.architecture["normalize_method"])
    return Normaliser.to_reference(method, load_reference(reference, card.input_mpp))


@dataclass(frozen=True)
class TranslateWork:
    grid: GridRecord
    margin: int  # context px on each side of a grid tile
    side: int  # the generated tile: grid tile plus margins
    store: Path
    slide_path: str


class TranslateStep(SlideStep[SlideRecord, TranslateWork]):
    label = "translate"

    def __init__(self, ws: Workspace, progress: Progress, options: TranslateOptions,
                 card: ModelCard, engine: Engine | None, directory: Path | None = None,
                 normaliser: Normaliser | None = None) -> None:
        """`engine` None: a cluster's driver, which plans and records while the workers
        translate; `shape` is then set from a worker's engine before the first plan."""
        super().__init__(ws, progress, force=options.force)
        self.options, self.card, self._engine = options, card, engine
        self.shape = EngineShape.of(engine) if engine is not None else None
        self.directory = directory
        self.normaliser = normaliser  # tiles normalised first, fitted per slide

    def slide(self, item: SlideRecord) -> SlideRecord:
        return item

    def step_name(self, item: SlideRecord) -> str:
        return Workspace.translate_step(self.card.name)

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, TranslateWork]:
        card, options, m, shape = self.card, self.options, self.manifest, self.shape
        assert shape is not None, "a cluster's driver plans once a worker gave the shape"
        grid = self.model_grid(slide, card)
        margin = _margin(slide.path, grid.tile_size, card, shape, options)
        side = grid.tile_size + 2 * margin
        if side % shape.multiple:
            raise SlideError(slide.path, f"{card.name} needs tiles of a multiple of "
                             f"{shape.multiple} px; re-tile with --tile-size "
                             f"{card.tile_size}")
        filtered = m.step(slide.id, Workspace.FILTER)
        params: dict[str, object] = {
            "model": card.name, "margin": margin, "grid": grid.params_hash,
            "filter": filtered.params_hash if filtered else None,
            "background": "the model's glass"}  # was a fixed near-white: such stores are redone
        params.update(shape.settings)  # what changes the pixels; batching and device
        if not shape.deterministic:  # do not
            params["seed"] = options.seed
        if self.normaliser is not None:  # absent without one: older stores stay valid
            params["normalize"] = self.normaliser.settings()
        work = TranslateWork(grid, margin, side, self.ws.tile_store_path(slide.key, card.name),
                             slide.path)
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

    def process(self, plans: Iterator[SlidePlan[SlideRecord, TranslateWork]]
                ) -> Iterator[tuple[SlidePlan[SlideRecord, TranslateWork],
                                    SlideOutcome | Failure]]:
        if not self.options.on_cluster:
            yield from super().process(plans)
            return
        from stainctl.steps.translate_cluster import run_on_cluster

        yield from run_on_cluster(self, plans)

    @property
    def engine(self) -> Engine:
        """The loaded engine (in process; a cluster's driver has none)."""
        assert self._engine is not None, "the cluster's driver loads no engine"
        return self._engine

    def slide_engine(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> Engine:
        """The engine for one slide: with a normaliser, one whose tiles are normalised first
        with the stain fitted on this slide (kept in the manifest)."""
        if self.normaliser is None:
            return self.engine
        from stainctl.normalize.classical import NormalisedInput
        from stainctl.steps.stain_fit import fit_slide

        transform = fit_slide(self.ws, plan.slide, plan.work.grid, self.normaliser, plan.step)
        return NormalisedInput(self.engine, transform)

    def run_one(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> SlideOutcome:
        import time

        from stainctl.steps.glass import glass_colour
        from stainctl.steps.translate_work import translate_tiles

        s, work, options = plan.slide, plan.work, self.options
        engine = self.slide_engine(plan)
        source = self.source(work)
        background = _resumed_background(work.store) or glass_colour(
            self.ws, s, work.grid, engine, source, work.margin,
            tile_seed(options.seed, s.key, -1, -1))
        store, tiles, present = self.open_store(plan, background)
        t0 = time.perf_counter()
        n = translate_tiles(engine, source, store, tiles, present=present, slide_key=s.key,
                            margin0=self.margin0(work), seed=options.seed,
                            batch_size=self.batch_size, readers=self.readers,
                            advance=self.progress.advance)
        return self.finished(plan, n, time.perf_counter() - t0)

    # --- shared with the cluster run (translate_cluster.py) -----------------------------------
    @property
    def batch_size(self) -> int:
        assert self.shape is not None
        return self.options.batch_size or self.shape.batch_size

    @property
    def readers(self) -> int:
        assert self.shape is not None
        return self.options.readers or self.shape.readers

    @staticmethod
    def margin0(work: TranslateWork) -> float:
        """The context margin in level-0 px."""
        return work.margin * work.grid.extent0 / work.grid.tile_size

    def source(self, work: TranslateWork) -> TileSource:
        """Tiles with their context margin, at the model's side."""
        from stainctl.slide.tiles import TileSource

        return TileSource(work.slide_path, work.grid.extent0 + 2 * self.margin0(work),
                          work.side)

    def open_store(self, plan: SlidePlan[SlideRecord, TranslateWork],
                   background: tuple[int, int, int]
                   ) -> tuple[TileStore, NDArray[np.int64], NDArray[np.bool_]]:
        """The slide's store (created, or reopened to resume; recorded in the manifest), its
        tissue tiles ((n, 4): col, row, level-0 x, y) and which of them it holds already. Those
        leave the progress total: a resumed run counts only the tiles left."""
        from stainctl.workspace.tilestore import create_for_slide

        s = plan.slide
        store = create_for_slide(self.ws, s, self.card.name, plan.work.margin,
                                 {"model": self.card.name, "background": list(background)})
        todo = np.asarray([(t.col, t.row, t.x, t.y) for t in self.manifest.tissue_tiles(s.id)],
                          np.int64).reshape(-1, 4)
        present = store.written()[todo[:, 1], todo[:, 0]]
        self.progress.drop(int(present.sum()))
        return store, todo, present

    def finished(self, plan: SlidePlan[SlideRecord, TranslateWork], translated: int,
                 seconds: float) -> SlideOutcome:
        """Mark the store complete, record it, and say how fast the slide went."""
        from stainctl.workspace.tilestore import TileStore

        s, path = plan.slide, plan.work.store
        store = TileStore.open(path)
        store.finish()
        self.manifest.record_artifact(s.id, "tile_store", self.ws.relative(path), plan.phash)
        total = int(store.written().sum())
        rate = translated / seconds if translated and seconds > 0 else 0.0
        return SlideOutcome(s.key, s.path, "done",
                            f"{translated} tile(s) translated"
                            + (f" at {rate:.2f} tiles/s" if translated else "")
                            + f"; {total} in the store: every tissue tile, those the filter "
                              "rejected too",
                            {"store": str(path), "translated_now": translated, "tiles": total,
                             "tiles_per_s": round(rate, 3)})


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


def _margin(path: str, tile_size: int, card: ModelCard, shape: EngineShape,
            options: TranslateOptions) -> int:
    """Context px on each side of a grid tile: fixed by the grid for a fixed-size generator,
    else --overlap or the card's margin."""
    side = shape.input_side
    if side is None:
        return int(options.overlap if options.overlap is not None else shape.margin)
    margin, odd = divmod(side - tile_size, 2)
    if margin < 0 or odd or (options.overlap is not None and margin != options.overlap):
        overlap = shape.margin if options.overlap is None else options.overlap
        raise SlideError(path, f"{card.name} generates {side}-px tiles; with a {overlap}-px "
                         f"overlap, tile at --tile-size {side - 2 * overlap} (this workspace "
                         f"has {tile_size}-px tiles)")
    return margin
