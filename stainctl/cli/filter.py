"""`stainctl filter`: measure blur, stain and background per tile; keep the informative ones."""

from __future__ import annotations

from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def filter_tiles(
    workspace: opt.Workspace,
    min_laplacian: Annotated[float, typer.Option(
        help="Reject tiles whose grey-level Laplacian variance is below this (blur).")] = 100.0,
    min_saturated: Annotated[float, typer.Option(
        help="Reject tiles with a smaller fraction of pixels of HSV saturation > 30.")] = 0.10,
    max_white: Annotated[float, typer.Option(
        help="Reject tiles with a larger fraction of near-white pixels (mean RGB > 235).")] = 0.60,
    scheduler: Annotated[str | None, typer.Option(
        help="Address of a running Dask distributed scheduler; default: local threads.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Local threads (default: one per core).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per Dask task.")] = 100,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Compute the tile quality metrics (resumable) and set keep/reject from the thresholds."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.cli.render import batch_summary
        from stainctl.errors import UsageError
        from stainctl.quality.metrics import FilterThresholds
        from stainctl.steps.filter import FilterOptions, filter_slides
        from stainctl.workspace import Workspace

        if batch_size < 1 or (workers is not None and workers < 1):
            raise UsageError("--batch-size and --workers must be at least 1")
        options = FilterOptions(FilterThresholds(min_laplacian, min_saturated, max_white),
                                scheduler, workers, batch_size, force)
        ws = Workspace.open(workspace)
        with ws.writing("filter", vars(options)), out.progress() as p:
            result = filter_slides(ws, options, p)
            ws.partial = bool(result.failed)
        out.emit(result.as_dict(), lambda: batch_summary(result))
        return result.exit_code

    run_command(out, body)
