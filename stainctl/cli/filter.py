"""`stainctl filter`: measure blur, stain and background per tile; keep the informative ones."""

from __future__ import annotations

from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Batch, Output, run_batch


def filter_tiles(
    workspace: opt.Workspace,
    min_laplacian: Annotated[float, typer.Option(
        help="Reject tiles whose grey-level Laplacian variance is below this (blur).")] = 100.0,
    min_saturated: Annotated[float, typer.Option(
        help="Reject tiles with a smaller fraction of pixels of HSV saturation > 30.")] = 0.10,
    max_white: Annotated[float, typer.Option(
        help="Reject tiles with a larger fraction of near-white pixels (mean RGB > 235).")] = 0.60,
    scheduler: opt.Scheduler = None,
    workers: Annotated[int | None, typer.Option(
        help="Local threads (default: one per core).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per Dask task.")] = 100,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Compute the tile quality metrics (resumable) and set keep/reject from the thresholds."""
    def prepare() -> Batch:
        from stainctl.quality.metrics import FilterThresholds
        from stainctl.steps.filter import FilterOptions, filter_slides

        options = FilterOptions(
            thresholds=FilterThresholds(min_laplacian=min_laplacian,
                                        min_saturated=min_saturated, max_white=max_white),
            scheduler=scheduler, workers=workers, batch_size=batch_size, force=force)
        return Batch(params=vars(options),
                     step=lambda ws, progress: filter_slides(ws, options, progress))

    run_batch(Output(json_out, quiet, verbose), workspace, "filter", prepare)
