"""`filter`: measure every tissue tile (blur, stain, background) and keep the informative ones.

Metrics are stored, not only the verdict: changing a threshold re-judges without re-reading.
A killed run resumes with the tiles that have no metrics yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import UsageError
from stainctl.quality.metrics import FilterThresholds
from stainctl.slide.tiles import TileSource
from stainctl.steps.lifecycle import Failure, SlidePlan, SlideStep
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.workspace import SlideRecord, StepRecord, Workspace


@dataclass(frozen=True, kw_only=True)
class FilterOptions:
    thresholds: FilterThresholds = field(default_factory=FilterThresholds)
    scheduler: str | None = None  # Dask distributed address; None = local threads
    workers: int | None = None
    batch_size: int = 100  # tiles per Dask task (~0.6 ms overhead per task, docs/NOTES.md)
    force: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise UsageError("--batch-size and --workers must be at least 1")


def filter_slides(ws: Workspace, options: FilterOptions,
                  progress: Progress | None = None) -> BatchResult:
    progress = progress or SilentProgress()
    ready = ws.manifest.slides_done(Workspace.TILE)
    if not ready:
        raise UsageError(f"nothing to filter in {ws.root}: no slide has been tiled; "
                         "run `stainctl tile SLIDES -w WS` first")
    if options.scheduler:  # unreachable: say so before --force clears what was measured
        from stainctl.cluster.connect import probe

        probe(options.scheduler)
    if options.force:
        for s in ready:
            ws.manifest.clear_metrics(s.id)
    return FilterStep(ws, progress, options).run(ready)


@dataclass(frozen=True)
class FilterWork:
    source: TileSource
    pending: NDArray[np.int64]  # (n, 3): tile id, level-0 x, y of the tiles not yet measured


class FilterStep(SlideStep[SlideRecord, FilterWork]):
    """Tiles of every slide are measured together on the Dask runner (the slow part); then
    each slide is judged, which is quick and always redone, so a slide is never skipped
    up front: it is "skipped" when nothing was measured and the verdict is unchanged."""

    label = "filter"

    def __init__(self, ws: Workspace, progress: Progress, options: FilterOptions) -> None:
        super().__init__(ws, progress, force=options.force)
        self.options = options
        self.params = options.thresholds.as_dict()

    def slide(self, item: SlideRecord) -> SlideRecord:
        return item

    def step_name(self, item: SlideRecord) -> str:
        return Workspace.FILTER

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, FilterWork]:
        grid = self.manifest.grid(slide.id)
        assert grid is not None  # tiled slides have a grid
        pending = np.asarray(self.manifest.unmeasured_tiles(slide.id), np.int64).reshape(-1, 3)
        return SlidePlan(item=item, slide=slide, step=Workspace.FILTER, params=self.params,
                         work=FilterWork(TileSource(slide.path, grid.extent0, grid.tile_size),
                                         pending), previous=previous)

    def up_to_date(self, plan: SlidePlan[SlideRecord, FilterWork]) -> bool:
        return False

    def start(self, plan: SlidePlan[SlideRecord, FilterWork]) -> None:
        if len(plan.work.pending):
            super().start(plan)

    def skipped(self, plan: SlidePlan[SlideRecord, FilterWork]) -> SlideOutcome:
        raise AssertionError("filter judges every slide; up_to_date is never true")

    def run_one(self, plan: SlidePlan[SlideRecord, FilterWork]) -> SlideOutcome:
        return self._judge(plan, measured_now=0)

    def process(self, plans: Iterator[SlidePlan[SlideRecord, FilterWork]]
                ) -> Iterator[tuple[SlidePlan[SlideRecord, FilterWork], SlideOutcome | Failure]]:
        from stainctl.quality import runner

        todo = list(plans)
        size = self.options.batch_size
        tasks = [runner.MeasureTask(p.slide.id, p.work.source, p.work.pending[i:i + size])
                 for p in todo for i in range(0, len(p.work.pending), size)]
        errors: dict[int, str] = {}
        measured: dict[int, int] = {}
        self.progress.start("filter", sum(len(t.tiles) for t in tasks))
        for res in runner.run(tasks, self.options.scheduler, self.options.workers):
            if res.error is not None or res.metrics is None:
                errors.setdefault(res.slide_id, res.error or "no result")
            elif res.slide_id not in errors:
                self.manifest.store_metrics(res.metrics.tolist())
                measured[res.slide_id] = measured.get(res.slide_id, 0) + len(res.metrics)
            self.progress.advance(len(res.metrics) if res.metrics is not None else 0)
        for plan in todo:
            if plan.slide.id in errors:
                yield plan, Failure(f"could not read tiles: {errors[plan.slide.id]}")
            else:
                yield plan, self._judge(plan, measured.get(plan.slide.id, 0))

    def _judge(self, plan: SlidePlan[SlideRecord, FilterWork], measured_now: int) -> SlideOutcome:
        t = self.options.thresholds
        verdict = self.manifest.judge_tiles(plan.slide.id, t.min_laplacian, t.min_saturated,
                                            t.max_white)
        kept, measured = verdict["kept"], verdict["measured"]
        unchanged = not self.force and not len(plan.work.pending) and plan.done_before
        return SlideOutcome(
            plan.slide.key, plan.slide.path, "skipped" if unchanged else "done",
            f"{kept} of {measured} tissue tiles kept" + _reasons(verdict),
            {"tiles_measured": measured, "tiles_kept": kept, "tiles_measured_now": measured_now,
             "rejected_for": {k: verdict[k] for k in ("blurry", "faint", "background")}})


def _reasons(verdict: dict[str, int]) -> str:
    """Why tiles were rejected, in words a technician can act on."""
    rejected = verdict["measured"] - verdict["kept"]
    if not rejected:
        return ""
    words = {"background": "mostly glass", "blurry": "blurred", "faint": "weakly stained"}
    parts = [f"{verdict[k]} {w}" for k, w in words.items() if verdict[k]]
    # A tile can fail several tests: say so when the counts add up to more than the rejected.
    overlap = "; a tile can fail several" if sum(verdict[k] for k in words) > rejected else ""
    return f"; {rejected} rejected: " + ", ".join(parts) + overlap
