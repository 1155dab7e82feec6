"""The per-slide lifecycle every step shares.

    plan -> skip (done with the same parameters) or start (mark running) -> run one slide
         -> record done or failed -> outcome

A step subclasses `SlideStep` and writes only what is its own: which slide an item is about, its
parameters and work (`plan`), the work itself (`run_one`), and the words of its outcomes. The
bookkeeping (the manifest's step states, the error reasons, the progress lines, one bad slide
never stopping the batch) is here, once.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from stainctl.errors import SlideError
from stainctl.steps.report import BatchResult, Progress, SlideOutcome, params_hash, unexpected
from stainctl.workspace import GridRecord, SlideRecord, StepRecord, Workspace
from stainctl.workspace.manifest import ManifestDamaged

if TYPE_CHECKING:
    from stainctl.models.card import ModelCard

log = logging.getLogger(__name__)
MPP_TOLERANCE = 0.1  # a grid within 10 % of a model's resolution is used as it is

I = TypeVar("I")  # noqa: E741  # what a step is given per slide: a slide, a request, a job
W = TypeVar("W")  # the step's own work for one slide


@dataclass(frozen=True, kw_only=True)
class SlidePlan(Generic[I, W]):
    """One slide's planned work in one step."""

    item: I
    slide: SlideRecord
    step: str  # the manifest step name
    params: Mapping[str, object]  # what the result depends on; its hash decides skip or redo
    work: W
    previous: StepRecord | None  # the step's state before this run

    @property
    def phash(self) -> str:
        return params_hash(self.params)

    @property
    def done_before(self) -> bool:
        """Done by an earlier run with these same parameters."""
        return self.previous is not None and self.previous.done_with(self.phash)


@dataclass(frozen=True)
class Failure:
    """Why one slide failed: a sentence naming the fix, recorded in the manifest."""

    reason: str
    code: str | None = None  # its kind, when the fix is not "run again" (errors.NO_MPP)

    @classmethod
    def of(cls, err: Exception, what: object, where: Path | None = None) -> Failure:
        """`where`: the folder the step writes in, named when a full disk names no file."""
        log.debug("%s failed", what, exc_info=not isinstance(err, SlideError))
        if isinstance(err, SlideError):
            return cls(err.reason, err.code)
        return cls(unexpected(err, where))


class SlideStep(ABC, Generic[I, W]):
    """A pipeline step over slides. `run(items)` drives the lifecycle; subclasses fill in."""

    label: ClassVar[str]  # the step as the summary names it ("tile", "translate", ...)
    # Progress counts items (tile, stitch); the other steps count tiles in their own work.
    counts_items: ClassVar[bool] = False

    def __init__(self, ws: Workspace, progress: Progress, *, force: bool) -> None:
        self.ws = ws
        self.manifest = ws.manifest
        self.progress = progress
        self.force = force

    # --- what each step writes ----------------------------------------------------------------
    @abstractmethod
    def slide(self, item: I) -> SlideRecord:
        """The manifest slide `item` is about (registered if it is new)."""

    @abstractmethod
    def step_name(self, item: I) -> str:
        """The manifest step name for `item` (`Workspace.*_step`)."""

    @abstractmethod
    def plan(self, item: I, slide: SlideRecord, previous: StepRecord | None) -> SlidePlan[I, W]:
        """Parameters and work for one slide; raise SlideError when it cannot be done."""

    @abstractmethod
    def skipped(self, plan: SlidePlan[I, W]) -> SlideOutcome:
        """The outcome of a slide already done with the same parameters."""

    @abstractmethod
    def run_one(self, plan: SlidePlan[I, W]) -> SlideOutcome:
        """Do one slide's work and return its outcome ("done"); raise to fail it."""

    # --- hooks with a default -----------------------------------------------------------------
    def up_to_date(self, plan: SlidePlan[I, W]) -> bool:
        """Whether the slide can be skipped (never with --force): by default, done before with
        the same parameters."""
        return plan.done_before

    def start(self, plan: SlidePlan[I, W]) -> None:
        """Mark the slide running, so an interrupted run shows (and resumes)."""
        self.manifest.set_step(plan.slide.id, plan.step, "running", params_hash=plan.phash,
                               params=plan.params, run_id=self.ws.run_id)

    def model_grid(self, slide: SlideRecord, card: ModelCard) -> GridRecord:
        """The slide's grid, refused when its tiles are not at the model's µm/px (within
        MPP_TOLERANCE: closer than that, the model takes them as they are)."""
        grid = self.manifest.grid(slide.id)
        assert grid is not None  # the steps that run models follow tile and filter
        if abs(grid.target_mpp - card.input_mpp) > MPP_TOLERANCE * card.input_mpp:
            raise SlideError(slide.path, f"tiles are at {grid.target_mpp} µm/px but {card.name} "
                             f"takes {card.input_mpp} µm/px; re-tile with --target-mpp "
                             f"{card.input_mpp}")
        return grid

    def where(self, item: I) -> Path | None:
        """The folder this step writes `item`'s results in (for a disk-full reason)."""
        return None

    def failed(self, item: I, slide: SlideRecord, failure: Failure) -> SlideOutcome:
        return SlideOutcome(slide.key, slide.path, "failed", failure.reason, code=failure.code)

    def process(self, plans: Iterator[SlidePlan[I, W]]
                ) -> Iterator[tuple[SlidePlan[I, W], SlideOutcome | Failure]]:
        """Run the started plans; by default one after the other, as they are planned. Steps
        that spread slides over workers (embed) or tiles over threads (filter) override it."""
        for plan in plans:
            try:
                yield plan, self.run_one(plan)
            except ManifestDamaged:
                raise  # the workspace's fault, not this slide's: every slide would fail so
            except Exception as err:  # one bad slide must not stop the batch
                yield plan, Failure.of(err, plan.slide.path, self.where(plan.item))

    # --- the lifecycle ------------------------------------------------------------------------
    def run(self, items: Iterable[I]) -> BatchResult:
        result = BatchResult(self.label)

        def started() -> Iterator[SlidePlan[I, W]]:
            for item in items:
                slide = self.slide(item)
                step = self.step_name(item)
                plan: SlidePlan[I, W] | None = None
                try:
                    plan = self.plan(item, slide, self.manifest.step(slide.id, step))
                    if not self.force and self.up_to_date(plan):
                        self._report(result, self.skipped(plan))
                        continue
                    self.start(plan)
                except ManifestDamaged:
                    raise  # as in process()
                except Exception as err:  # one bad slide must not stop the batch
                    self._fail(result, item, slide, step, plan,
                               Failure.of(err, slide.path, self.where(item)))
                    continue
                yield plan

        for plan, outcome in self.process(started()):
            if isinstance(outcome, Failure):
                self._fail(result, plan.item, plan.slide, plan.step, plan, outcome)
            else:
                self.manifest.set_step(plan.slide.id, plan.step, "done", params_hash=plan.phash,
                                       params=plan.params, run_id=self.ws.run_id)
                self._report(result, outcome)
        return result

    def _fail(self, result: BatchResult, item: I, slide: SlideRecord, step: str,
              plan: SlidePlan[I, W] | None, failure: Failure) -> None:
        # The parameters go with the failure when they are known, so a rerun with the same ones
        # resumes what was made (a tile store, filter metrics) instead of starting again.
        self.manifest.set_step(slide.id, step, "failed",
                               params_hash=plan.phash if plan else None,
                               params=plan.params if plan else None,
                               error=failure.reason, code=failure.code,
                               run_id=self.ws.run_id)
        self._report(result, self.failed(item, slide, failure))

    def _report(self, result: BatchResult, outcome: SlideOutcome) -> None:
        result.slides.append(outcome)
        # A slide with a warning is named by its path: the line says which file to check.
        self.progress.log(f"{outcome.path if outcome.warning else outcome.slide}: "
                          f"{outcome.label}" + (f" ({outcome.message})" if outcome.message else ""),
                          warning=outcome.warning is not None)
        if self.counts_items:
            # Only slides that did work count: a skipped one leaves the total instead.
            if outcome.state == "skipped":
                self.progress.drop()
            else:
                self.progress.advance()
