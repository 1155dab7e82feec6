"""`stainctl stitch`: translated tiles -> seam-free pyramidal OME-TIFF (or TIFF) per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_batch


def stitch(
    workspace: opt.Workspace,
    marker: Annotated[list[str] | None, typer.Option(
        "--marker", "-m", help="Stitch this marker only (repeatable); default: all.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output",
        help="Output directory (default WS/outputs), or a .tif file when one output is made.")]
    = None,
    fmt: Annotated[opt.Format, typer.Option(
        "--format", help="ome-tiff (pyramid in SubIFDs; QuPath, Bio-Formats) or tiff "
                         "(levels as pages; OpenSlide).")] = "ome-tiff",
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
    from stainctl.steps.stitch import StitchOptions, stitch_slides
    from stainctl.stitch.pyramid import PyramidOptions

    out = Output(json_out, quiet, verbose)
    options = StitchOptions(
        pyramid=PyramidOptions(fmt, compression, quality, tile),
        markers=tuple(marker or ()), output=output, level0=level0,
        background=_rgb(out, background), force=force)
    run_batch(out, workspace, "stitch", vars(options),
              lambda ws, progress: stitch_slides(ws, options, progress))


def _rgb(out: Output, text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        r, g, b = (int(v) for v in text.split(","))
        if all(0 <= v <= 255 for v in (r, g, b)):
            return r, g, b
    except ValueError:
        pass
    out.error(f"--background must be R,G,B with values in 0..255 (e.g. 245,245,245), "
              f"got {text!r}")
    raise typer.Exit(2)
