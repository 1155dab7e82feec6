"""`stainctl stitch`: translated tiles -> seam-free pyramidal OME-TIFF (or TIFF) per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Batch, Output, run_batch
from stainctl.errors import UsageError


def stitch(
    workspace: opt.Workspace,
    marker: Annotated[list[str] | None, typer.Option(
        "--marker", "-m", help="Stitch this marker only (repeatable); default: all.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output",
        help="Output directory (default WS/outputs), or a .tif file when one output is made.")]
    = None,
    fmt: Annotated[opt.Format, opt.pyramid_format()] = "ome-tiff",
    compression: Annotated[str, typer.Option(help="jpeg, lzw, deflate or none.")] = "jpeg",
    quality: Annotated[int, typer.Option(help="JPEG quality (1-100).")] = 90,
    tile: Annotated[int, typer.Option("--tile", help="TIFF tile side in pixels.")] = 512,
    level0: Annotated[bool, typer.Option(
        "--level0", help="Resample to the source slide's level-0 pixel size, so the output "
                         "overlays the H&E pixel for pixel.")] = False,
    background: Annotated[str | None, typer.Option(
        help="R,G,B filling tiles without tissue; default: the model's, else 245,245,245.")]
    = None,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Blend each slide's translated tiles and write a pyramidal slide with a PNG thumbnail."""

    def prepare() -> Batch:
        from stainctl.cli.outdir import check_output_folder
        from stainctl.steps.stitch import StitchOptions, stitch_slides
        from stainctl.stitch.pyramid import PyramidOptions

        options = StitchOptions(
            pyramid=PyramidOptions(format=fmt, compression=compression, quality=quality,
                                   tile=tile),
            markers=tuple(marker or ()), output=output, level0=level0,
            background=_rgb(background), force=force)
        if output is not None:
            check_output_folder(output.parent if options.single_file else output, "-o", output)
        return Batch(params=vars(options),
                     step=lambda ws, progress: stitch_slides(ws, options, progress))

    run_batch(Output(json_out, quiet, verbose), workspace, "stitch", prepare)


def _rgb(text: str | None) -> tuple[int, int, int] | None:
    """--background R,G,B as numbers; StitchOptions checks their range."""
    if text is None:
        return None
    try:
        r, g, b = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError("--background must be R,G,B with values in 0..255 (e.g. 245,245,245), "
                         f"got {text!r}") from None
    return r, g, b
