"""`stainctl tile`: register slides, detect tissue and lay the tile grid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Batch, Output, run_batch
from stainctl.steps import MAIN_JOB_MIN_TISSUE

if TYPE_CHECKING:
    from stainctl.steps.report import BatchResult
    from stainctl.workspace import Workspace


def tile(
    slides: Annotated[list[str], typer.Argument(
        help="Slides: files, globs, directories, or a CSV with `path[,mpp]` rows.")],
    workspace: opt.Workspace,
    mpp: opt.Mpp = None,
    target_mpp: Annotated[float, typer.Option(help="Tile resolution in µm/px.")] = 0.5,
    tile_size: opt.TileSize = 512,
    overlap: Annotated[int, typer.Option(help="Overlap between tiles in pixels.")] = 0,
    min_tissue: Annotated[float, typer.Option(
        help="Keep tiles with at least this tissue fraction. The main job (`translate "
             f"SLIDES`) uses {MAIN_JOB_MIN_TISSUE}, so its virtual slides cover the edges of "
             f"the tissue: give {MAIN_JOB_MIN_TISSUE} to tile a workspace for `translate -w` "
             "the same way.")] = 0.25,
    tissue_threshold: Annotated[int, typer.Option(
        help="HSV saturation (0-255) above which a thumbnail pixel is tissue.")] = 15,
    allow_dark: Annotated[bool, typer.Option(
        "--allow-dark",
        help="Process slides with a dark background (fluorescence), normally refused.")] = False,
    max_thumbnail_read: opt.MaxThumbnailRead = None,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Find tissue on each slide and lay a grid of tiles over it (first step of a workspace)."""

    def prepare() -> Batch:
        # Everything that can be wrong with the arguments, slide paths included, is found here,
        # before the workspace is created: a typo leaves no empty workspace behind.
        from stainctl.slide.grid import GridParams
        from stainctl.slide.inputs import expand_slides
        from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
        from stainctl.slide.tissue import TissueParams
        from stainctl.steps.tile import TileOptions, tile_slides

        options = TileOptions(
            grid=GridParams(target_mpp=target_mpp, tile_size=tile_size, overlap=overlap,
                            min_tissue=min_tissue),
            tissue=TissueParams(saturation=tissue_threshold, allow_dark=allow_dark),
            max_thumbnail_read=max_thumbnail_read or DEFAULT_MAX_READ_GPX, force=force)
        requests = expand_slides(slides, mpp)
        return Batch(params={"slides": slides, **vars(options)},
                     step=lambda ws, progress: tile_slides(ws, requests, options, progress),
                     after=_where_thumbnails_are)

    run_batch(Output(json_out, quiet, verbose), workspace, "tile", prepare, create=True)


def _where_thumbnails_are(ws: Workspace, result: BatchResult) -> None:
    if any(s.state != "failed" for s in result.slides):
        thumbnail, mask = ws.thumbnail_path("<slide>"), ws.tissue_mask_path("<slide>")
        typer.echo(f"Thumbnails and tissue masks: {thumbnail.parent}/ "
                   f"({thumbnail.name}, {mask.name})")
