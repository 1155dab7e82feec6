"""`normalize`: whole slides brought to a reference's stain, through the main job's machinery.

tile -> filter -> normalize -> stitch -> side-by-side PNG (source | normalised | target). The
normalize step is the translate step (`translate.py`: tiles with their context margin into the
slide's tile store, resumable, glass measured once) with a normaliser as its engine:
  * `macenko`, `reinhard` (normalize/classical.py): the identity engine with the stain fitted
    once per slide put in front (`TranslateStep.slide_engine`); the fit is kept in the manifest;
  * `stainfuser`: the learned engine from the registry (card `stainfuser`), given the reference.
Outputs are named `<slide>.normalised.ome.tiff`; the store is `translated/normalised.zarr`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stainctl.errors import LEFT_OUT, UsageError
from stainctl.normalize import CLASSICAL, METHODS
from stainctl.slide.inputs import SlideRequest
from stainctl.steps import MAIN_JOB_MIN_TISSUE
from stainctl.steps.lifecycle import SlidePlan
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.steps.translate import TranslateOptions, TranslateStep, TranslateWork
from stainctl.stitch.pyramid import PyramidOptions
from stainctl.workspace import SlideRecord, StepRecord, Workspace

if TYPE_CHECKING:
    from stainctl.engines.base import Engine
    from stainctl.models.card import ModelCard
    from stainctl.normalize.sample import StainSample

OUTPUT = "normalised"  # the output's name part (<slide>.normalised.ome.tiff) and tile store
STEP = "normalize"  # the manifest step


@dataclass(frozen=True, kw_only=True)
class NormalizeOptions:
    target: Path  # the reference: an image or a slide
    method: str = "macenko"
    model: str = "stainfuser"  # the learned normaliser's card (--method stainfuser)
    models_dir: Path | None = None
    target_mpp: float = 0.5
    tile_size: int = 512  # classical methods; stainfuser takes its card's
    device: str = "auto"
    batch_size: int = 8
    readers: int = 2
    steps: int = 20  # stainfuser's denoising steps
    seed: int = 0
    dtype: str = "auto"
    overlap: int | None = None  # context px each side (stainfuser); classical methods need none
    scheduler: str | None = None  # a Dask scheduler for the filter step
    workers: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method}")
        if not self.target_mpp > 0 or self.tile_size < 64:
            raise UsageError("--target-mpp must be positive and --tile-size at least 64")
        self.translate_options()  # checks --batch-size, --steps, --dtype

    @property
    def classical(self) -> bool:
        return self.method in CLASSICAL

    def translate_options(self) -> TranslateOptions:
        return TranslateOptions(marker=OUTPUT, models_dir=self.models_dir, device=self.device,
                                batch_size=self.batch_size, readers=self.readers,
                                force=self.force, steps=self.steps, guidance=1.0, seed=self.seed,
                                dtype=self.dtype,
                                overlap=0 if self.classical else self.overlap)


def classical_card(options: NormalizeOptions) -> ModelCard:
    """The normalize step's model for a classical method: no weights, the grid's resolution."""
    from stainctl.models.card import ModelCard

    return ModelCard(name=OUTPUT, kind="normaliser", engine=options.method,
                     input_mpp=options.target_mpp, tile_size=options.tile_size,
                     licence="", intended_use="stain normalisation", training_data="")


def load_normaliser(options: NormalizeOptions, reference: StainSample
                    ) -> tuple[ModelCard, Engine, dict[str, object]]:
    """The step's model card (named `OUTPUT`), its engine, and what of the reference enters the
    parameters: for a classical method the identity engine (the fit goes in front per slide)
    and the target's fitted parameters; for stainfuser the learned engine, given the reference,
    and a digest of the reference image."""
    import hashlib

    from stainctl.engines.base import load_engine
    from stainctl.models.registry import get_card, models_dir
    from stainctl.models.weights import check_installed
    from stainctl.normalize.classical import IdentityEngine

    if options.classical:
        card = classical_card(options)
        return card, IdentityEngine(card), {}
    directory = models_dir(options.models_dir)
    card = get_card(options.model, directory)
    check_installed([card], directory, verify=True)
    engine = load_engine(card, directory, options.translate_options().engine_options())
    assert reference.image is not None
    engine.set_reference(reference.image)  # type: ignore[attr-defined]
    digest = hashlib.sha256(reference.image.tobytes()).hexdigest()[:16]
    return dataclasses.replace(card, name=OUTPUT), engine, {"reference": digest,
                                                            "model": options.model}


class NormalizeStep(TranslateStep):
    label = "normalize"

    def __init__(self, ws: Workspace, progress: Progress, options: NormalizeOptions,
                 card: ModelCard, engine: Engine, extra: dict[str, object],
                 normaliser: object | None) -> None:
        super().__init__(ws, progress, options.translate_options(), card, engine,
                         normaliser=normaliser)  # type: ignore[arg-type]
        self.extra = extra

    def step_name(self, item: SlideRecord) -> str:
        return STEP

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, TranslateWork]:
        plan = super().plan(item, slide, previous)
        params = {**plan.params, **self.extra}
        return dataclasses.replace(plan, params=params)

    def skipped(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> SlideOutcome:
        return SlideOutcome(plan.slide.key, plan.slide.path, "skipped", "already normalised",
                            {"store": str(plan.work.store)})

    def run_one(self, plan: SlidePlan[SlideRecord, TranslateWork]) -> SlideOutcome:
        outcome = super().run_one(plan)
        n = outcome.details.get("translated_now", 0)
        return SlideOutcome(outcome.slide, outcome.path, outcome.state,
                            f"{n} tile(s) normalised", outcome.details)


def normalize_slides(ws: Workspace, options: NormalizeOptions, reference: StainSample,
                     progress: Progress | None = None) -> BatchResult:
    """The normalize step on the filtered slides of `ws`."""
    from stainctl.normalize.classical import Normaliser

    progress = progress or SilentProgress()
    normaliser = Normaliser.to_reference(options.method, reference) if options.classical \
        else None
    card, engine, extra = load_normaliser(options, reference)
    try:
        m = ws.manifest
        ready = m.slides_done(Workspace.FILTER)
        if not ready:
            raise UsageError(f"nothing to normalise in {ws.root}: no slide has been filtered")
        progress.start("normalize", sum(m.tile_counts(s.id)["tiles_tissue"] for s in ready))
        return NormalizeStep(ws, progress, options, card, engine, extra, normaliser).run(ready)
    finally:
        engine.close()


def grid_tile_size(options: NormalizeOptions) -> int:
    if options.classical:
        return options.tile_size
    from stainctl.engines.base import engine_spec
    from stainctl.models.registry import get_card, models_dir

    card = get_card(options.model, models_dir(options.models_dir))
    return engine_spec(card).grid_tile_size(card, options.overlap)


def run_normalize_job(ws: Workspace, requests: list[SlideRequest], options: NormalizeOptions,
                      output: Path, pyramid: PyramidOptions | None = None,
                      progress: Progress | None = None, *,
                      max_thumbnail_read: float | None = None) -> BatchResult:
    """tile -> filter -> normalize -> stitch -> side-by-side PNGs, as the main job."""
    from stainctl.normalize.sample import load_reference
    from stainctl.slide.grid import GridParams
    from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
    from stainctl.steps.filter import FilterOptions, filter_slides
    from stainctl.steps.pipeline import ChainTally, side_by_side_outcome
    from stainctl.steps.stitch import StitchOptions, stitch_slides
    from stainctl.steps.tile import TileOptions, tile_slides

    progress = progress or SilentProgress()
    if options.scheduler:  # an unreachable scheduler: say so before tiling anything
        from stainctl.cluster.connect import probe

        probe(options.scheduler)
    # A bad reference (uniform, glass only, no haematoxylin) stops before any slide is added.
    reference = load_reference(options.target, options.target_mpp)
    grid = GridParams(target_mpp=options.target_mpp, tile_size=grid_tile_size(options),
                      min_tissue=MAIN_JOB_MIN_TISSUE)
    pyramid = pyramid or PyramidOptions()
    max_read = max_thumbnail_read or DEFAULT_MAX_READ_GPX
    tally = ChainTally()
    steps = [
        (Workspace.TILE, lambda: tile_slides(ws, requests, TileOptions(
            grid=grid, force=options.force, max_thumbnail_read=max_read,
            dark_hint="stain normalisation is for brightfield H&E, so this one was left out",
            dark_code=LEFT_OUT), progress)),
        (Workspace.FILTER, lambda: filter_slides(ws, FilterOptions(
            force=options.force, scheduler=options.scheduler, workers=options.workers),
            progress)),
        (STEP, lambda: normalize_slides(ws, options, reference, progress)),
    ]
    stuck = tally.run(ws, steps, "normalize")
    if stuck is not None:
        return stuck
    stitch = StitchOptions(pyramid=pyramid, markers=(OUTPUT,), output=output,
                           force=options.force)
    stitched = stitch_slides(ws, stitch, progress)
    tally.keep(stitched)
    result = BatchResult("normalize")
    for o in stitched.slides:
        if o.state == "failed" or o.slide in tally.failed:
            continue
        result.slides.append(side_by_side_outcome(
            ws, stitch, o, OUTPUT, tally.worked, max_read, labels=("source", "normalised"),
            target=reference.image, target_label="target"))
    result.slides.extend(tally.failed.values())
    return result
