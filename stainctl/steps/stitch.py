"""`stitch`: every translated tile store of the workspace becomes a pyramidal slide.

One output per slide and marker. An output made with the same settings from the same tiles is
skipped; a failed slide is recorded and the others go on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stainctl.errors import SlideError, UsageError
from stainctl.steps.lifecycle import Failure, SlidePlan, SlideStep
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.stitch.pyramid import PyramidOptions
from stainctl.workspace import SlideRecord, StepRecord, Workspace

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from stainctl.stitch.stitcher import Overlay
    from stainctl.workspace.tilestore import StoreLayout, TileStore


@dataclass(frozen=True, kw_only=True)
class StitchOptions:
    pyramid: PyramidOptions = field(default_factory=PyramidOptions)
    markers: tuple[str, ...] = ()  # empty: every marker that has tiles
    output: Path | None = None  # a directory, or a file when one slide is stitched
    level0: bool = False
    background: tuple[int, int, int] | None = None  # None: the store's, else near-white
    force: bool = False

    def __post_init__(self) -> None:
        if self.background is not None and not all(0 <= v <= 255 for v in self.background):
            raise UsageError("--background must be R,G,B with values in 0..255 (e.g. "
                             f"245,245,245), got {','.join(map(str, self.background))}")

    @property
    def single_file(self) -> bool:
        """-o names one file rather than a folder."""
        return self.output is not None and self.output.suffix.lower() in (".tif", ".tiff")


@dataclass(frozen=True)
class StitchJob:
    """One slide and marker to stitch."""

    slide: SlideRecord
    marker: str
    store: Path
    output: Path


def stitch_slides(ws: Workspace, options: StitchOptions,
                  progress: Progress | None = None) -> BatchResult:
    progress = progress or SilentProgress()
    found = [(s, marker, path) for s in ws.manifest.slides()
             for marker, path in ws.tile_stores(s.key).items()
             if not options.markers or marker in options.markers]
    if not found:
        which = f" for {', '.join(options.markers)}" if options.markers else ""
        raise UsageError(f"nothing to stitch in {ws.root}: no translated tiles{which}; "
                         "run `stainctl translate -w WS --marker M` first")
    if options.single_file and len(found) > 1:
        raise UsageError(f"-o {options.output} names one file but there are {len(found)} "
                         "slide/marker outputs; give a directory or one --marker")
    jobs = [StitchJob(s, marker, path, output_path(ws, options, s.key, marker))
            for s, marker, path in found]
    progress.start("stitch", len(jobs))
    return StitchStep(ws, progress, options).run(jobs)


def output_path(ws: Workspace, options: StitchOptions, key: str, marker: str) -> Path:
    """Where the slide `key`'s `marker` output goes (its thumbnail: `pyramid.thumbnail`)."""
    if options.single_file:
        assert options.output is not None
        return options.output
    return ws.output_path(key, marker, options.pyramid.suffix, options.output)


@dataclass(frozen=True)
class StitchWork:
    store: TileStore
    background: tuple[int, int, int]
    written: NDArray[np.bool_]  # the store's tiles present, read once for the plan and the stitch


class StitchStep(SlideStep[StitchJob, StitchWork]):
    label = "stitch"
    counts_items = True

    def __init__(self, ws: Workspace, progress: Progress, options: StitchOptions) -> None:
        super().__init__(ws, progress, force=options.force)
        self.options = options

    def slide(self, item: StitchJob) -> SlideRecord:
        return item.slide

    def step_name(self, item: StitchJob) -> str:
        return Workspace.stitch_step(item.marker)

    def plan(self, item: StitchJob, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[StitchJob, StitchWork]:
        from stainctl.stitch.stitcher import DEFAULT_BACKGROUND
        from stainctl.workspace.tilestore import StoreError, TileStore

        try:
            store = TileStore.open(item.store, writable=False)
        except StoreError as err:
            raise SlideError(item.store, f"{err}; run `stainctl translate --force` for it"
                             ) from err
        written = store.written()
        if not store.complete:
            raise SlideError(item.store, f"the {item.marker} translation is incomplete "
                             f"({written.sum()} tiles so far); run `stainctl translate` again "
                             "to finish it")
        background = self.options.background or _rgb(store.meta.get("background"),
                                                      DEFAULT_BACKGROUND)
        params = {"pyramid": asdict(self.options.pyramid), "level0": self.options.level0,
                  "background": list(background), "output": str(item.output),
                  "store": store.generation, "tiles": int(written.sum())}
        return SlidePlan(item=item, slide=slide, step=self.step_name(item), params=params,
                         work=StitchWork(store, background, written), previous=previous)

    def up_to_date(self, plan: SlidePlan[StitchJob, StitchWork]) -> bool:
        return plan.done_before and plan.item.output.exists()

    def skipped(self, plan: SlidePlan[StitchJob, StitchWork]) -> SlideOutcome:
        job = plan.item
        return SlideOutcome(plan.slide.key, plan.slide.path, "skipped",
                            f"{job.marker}: already stitched to {job.output}",
                            {"marker": job.marker, "output": str(job.output),
                             "thumbnail": str(self.options.pyramid.thumbnail(job.output))})

    def where(self, item: StitchJob) -> Path:
        return item.output.parent

    def failed(self, item: StitchJob, slide: SlideRecord, failure: Failure) -> SlideOutcome:
        return SlideOutcome(slide.key, slide.path, "failed", f"{item.marker}: {failure.reason}",
                            code=failure.code)

    def run_one(self, plan: SlidePlan[StitchJob, StitchWork]) -> SlideOutcome:
        from stainctl.stitch.stitcher import Overlay, stitch_store

        slide, job, store = plan.slide, plan.item, plan.work.store
        overlay = None
        if self.options.level0:
            if not slide.mpp or not slide.width or not slide.height:
                raise SlideError(slide.path, "--level0 needs the slide's level-0 size and mpp, "
                                 "which the manifest lacks; run `stainctl tile --force` on it")
            overlay = Overlay(slide.width, slide.height, slide.mpp)
        annotations = {"source": slide.path, "marker": job.marker,
                       "model": str(store.meta.get("model", "unknown")),
                       "tile_store": self.ws.relative(job.store), "stainctl": _version(),
                       "grid": _grid_annotation(store.layout, overlay)}
        res = stitch_store(store, job.output, options=self.options.pyramid,
                           background=plan.work.background, name=image_name(slide.key, job.marker),
                           annotations=annotations, overlay=overlay,
                           written=plan.work.written)
        m = self.manifest
        m.record_artifact(slide.id, "stitched", self.ws.relative(res.path), plan.phash)
        m.record_artifact(slide.id, "stitched_thumbnail", self.ws.relative(res.thumbnail),
                          plan.phash)
        message = (f"{job.marker}: {res.width} x {res.height} px at {res.mpp:.4g} µm/px -> "
                   f"{res.path}")
        if overlay is None and slide.mpp and abs(res.mpp / slide.mpp - 1) > 0.1:
            # At the model's resolution, not the slide's: say why the sizes differ, and how to
            # get a slide that overlays the H&E pixel for pixel.
            message += (f" (the H&E is {slide.width} x {slide.height} px at {slide.mpp:.4g} "
                        f"µm/px: `stainctl stitch -w {self.ws.root} -o {res.path.parent} "
                        "--level0 --force` matches its pixels)")
        return SlideOutcome(
            slide.key, slide.path, "done", message,
            {"marker": job.marker, "output": str(res.path), "thumbnail": str(res.thumbnail),
             "width": res.width, "height": res.height, "mpp": res.mpp, "tiles": res.tiles})


def _rgb(value: object, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """The background a store's metadata names, else `default`."""
    if isinstance(value, list | tuple) and len(value) == 3:
        r, g, b = (int(v) for v in value)
        return r, g, b
    return default


def image_name(key: str, marker: str) -> str:
    """What viewers (QuPath, OMERO) list the output as: the slide, the marker, and that it is
    generated, so it is not taken for the H&E or for a real stain."""
    return f"{key} {marker} (virtual)"


def _grid_annotation(layout: StoreLayout, overlay: Overlay | None) -> str:
    """Where tiles meet in the output's pixels, so `evaluate` can measure seams later."""
    scale = layout.mpp / overlay.mpp if overlay is not None else 1.0
    return (f"stride={layout.stride * scale:.8g},offset={layout.overlap // 2 * scale:.8g},"
            f"cols={layout.cols},rows={layout.rows}")


def _version() -> str:
    from stainctl import __version__

    return __version__
