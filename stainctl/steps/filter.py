"""`filter`: measure every tissue tile (blur, stain, background) and keep the informative ones.

Metrics are stored, not only the verdict: changing a threshold re-judges without re-reading.
A killed run resumes with the tiles that have no metrics yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stainctl.errors import UsageError
from stainctl.quality.metrics import FilterThresholds
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome, params_hash
from stainctl.workspace import Workspace


@dataclass(frozen=True)
class FilterOptions:
    thresholds: FilterThresholds = field(default_factory=FilterThresholds)
    scheduler: str | None = None  # Dask distributed address; None = local threads
    workers: int | None = None
    batch_size: int = 100  # tiles per Dask task (~0.6 ms overhead per task, NOTES.md)
    force: bool = False


def filter_slides(ws: Workspace, options: FilterOptions,
                  progress: Progress | None = None) -> BatchResult:
    from stainctl.quality import runner
    from stainctl.slide.tiles import TileSource

    progress = progress or SilentProgress()
    if options.batch_size < 1 or (options.workers is not None and options.workers < 1):
        raise UsageError("--batch-size and --workers must be at least 1")
    m = ws.manifest
    result = BatchResult("filter")
    params = options.thresholds.as_dict()
    phash = params_hash(params)
    ready = m.slides_done("tile")
    if options.force:
        for s in ready:
            m.clear_metrics(s["id"])

    if not ready:
        raise UsageError(f"nothing to filter in {ws.root}: no slide has been tiled; "
                         "run `stainctl tile SLIDES -w WS` first")
    tasks = []
    for s in ready:
        grid = m.grid(s["id"])
        assert grid is not None
        pending = np.asarray(m.unmeasured_tiles(s["id"]), np.int64).reshape(-1, 3)
        if len(pending):
            m.set_step(s["id"], "filter", "running", params_hash=phash, params=params,
                       run_id=ws.run_id)
        source = TileSource(s["path"], grid["extent0"], grid["tile_size"])
        for i in range(0, len(pending), options.batch_size):
            tasks.append(runner.MeasureTask(s["id"], source, pending[i:i + options.batch_size]))

    measured_now = {t.slide_id for t in tasks}
    errors: dict[int, str] = {}
    measured_count: dict[int, int] = {}
    progress.start("filter", sum(len(t.tiles) for t in tasks))
    for res in runner.run(tasks, options.scheduler, options.workers):
        if res.error is not None or res.metrics is None:
            errors.setdefault(res.slide_id, res.error or "no result")
        elif res.slide_id not in errors:
            m.store_metrics(res.metrics.tolist())
            measured_count[res.slide_id] = measured_count.get(res.slide_id, 0) + len(res.metrics)
        progress.advance(len(res.metrics) if res.metrics is not None else 0)

    t = options.thresholds
    for s in ready:
        if s["id"] in errors:
            reason = f"could not read tiles: {errors[s['id']]}"
            m.set_step(s["id"], "filter", "failed", params_hash=phash, params=params,
                       error=reason, run_id=ws.run_id)
            outcome = SlideOutcome(s["key"], s["path"], "failed", reason)
        else:
            before = m.step(s["id"], "filter")
            verdict = m.judge_tiles(s["id"], t.min_laplacian, t.min_saturated, t.max_white)
            kept, measured = verdict["kept"], verdict["measured"]
            unchanged = (not options.force and s["id"] not in measured_now
                          and before is not None and before["state"] == "done"
                          and before["params_hash"] == phash)
            m.set_step(s["id"], "filter", "done", params_hash=phash, params=params,
                       run_id=ws.run_id)
            outcome = SlideOutcome(
                s["key"], s["path"], "skipped" if unchanged else "done",
                f"{kept} of {measured} tissue tiles kept" + _reasons(verdict),
                {"tiles_measured": measured, "tiles_kept": kept,
                 "tiles_measured_now": measured_count.get(s["id"], 0),
                 "rejected_for": {k: verdict[k] for k in ("blurry", "faint", "background")}})
        result.slides.append(outcome)
        progress.log(f"{outcome.slide}: {outcome.state} ({outcome.message})")
    return result


def _reasons(verdict: dict[str, int]) -> str:
    """Why tiles were rejected, in words a technician can act on."""
    rejected = verdict["measured"] - verdict["kept"]
    if not rejected:
        return ""
    words = {"background": "mostly glass", "blurry": "blurred", "faint": "weakly stained"}
    parts = [f"{verdict[k]} {w}" for k, w in words.items() if verdict[k]]
    return f"; {rejected} rejected: " + ", ".join(parts)
