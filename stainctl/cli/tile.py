"""`stainctl tile`: register slides, detect tissue and lay the tile grid."""

from __future__ import annotations

from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def tile(
    slides: Annotated[list[str], typer.Argument(
        help="Slides: files, globs, directories, or a CSV with `path[,mpp]` rows.")],
    workspace: opt.Workspace,
    mpp: Annotated[float | None, typer.Option(
        help="Pixel size in µm/px, overriding the slide metadata (needed for PNG/JPEG).")] = None,
    target_mpp: Annotated[float, typer.Option(help="Tile resolution in µm/px.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels at --target-mpp.")] = 512,
    overlap: Annotated[int, typer.Option(help="Overlap between tiles in pixels.")] = 0,
    min_tissue: Annotated[float, typer.Option(
        help="Keep tiles with at least this tissue fraction.")] = 0.25,
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
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.cli.render import batch_summary
        from stainctl.slide.grid import GridParams
        from stainctl.slide.inputs import expand_slides
        from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
        from stainctl.slide.tissue import TissueParams
        from stainctl.steps.tile import TileOptions, tile_slides
        from stainctl.workspace import Workspace

        options = TileOptions(
            grid=GridParams(target_mpp, tile_size, overlap, min_tissue),
            tissue=TissueParams(saturation=tissue_threshold, allow_dark=allow_dark),
            max_thumbnail_read=max_thumbnail_read or DEFAULT_MAX_READ_GPX, force=force)
        options.grid.validate()
        requests = expand_slides(slides, mpp)
        ws = Workspace.open(workspace, create=True)
        with ws.writing("tile", {"slides": slides, **vars(options)}), out.progress() as p:
            result = tile_slides(ws, requests, options, p)
            ws.partial = bool(result.failed)
        def human() -> None:
            batch_summary(result)
            if any(s.state != "failed" for s in result.slides):
                typer.echo(f"Thumbnails and tissue masks: {ws.root / 'slides'}/<slide>/ "
                           "(thumbnail.png, tissue_mask.png)")

        out.emit(result.as_dict(), human)
        return result.exit_code

    run_command(out, body)
