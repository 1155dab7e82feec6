"""`stainctl stitch`: translated tiles -> seam-free pyramidal OME-TIFF (or TIFF) per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def stitch(
    workspace: opt.Workspace,
    marker: Annotated[list[str] | None, typer.Option(
        "--marker", "-m", help="Stitch this marker only (repeatable); default: all.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output",
        help="Output directory (default WS/outputs), or a .tif file when one output is made.")]
    = None,
    fmt: Annotated[str, typer.Option(
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
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.cli.render import batch_summary
        from stainctl.steps.stitch import StitchOptions, stitch_slides
        from stainctl.stitch.pyramid import PyramidOptions
        from stainctl.workspace import Workspace

        options = StitchOptions(
            pyramid=PyramidOptions(fmt, compression, quality, tile),
            markers=tuple(marker or ()), output=output, level0=level0,
            background=_rgb(background), force=force)
        options.pyramid.validate()
        ws = Workspace.open(workspace)
        with ws.writing("stitch", vars(options)), out.progress() as p:
            result = stitch_slides(ws, options, p)
            ws.partial = bool(result.failed)
        out.emit(result.as_dict(), lambda: batch_summary(result))
        return result.exit_code

    run_command(out, body)


def _rgb(text: str | None) -> tuple[int, int, int] | None:
    from stainctl.errors import UsageError

    if text is None:
        return None
    try:
        r, g, b = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--background must be R,G,B (e.g. 245,245,245), got {text!r}") from None
    if not all(0 <= v <= 255 for v in (r, g, b)):
        raise UsageError(f"--background values must be in 0..255, got {text!r}")
    return r, g, b
