"""`stainctl readout`: DAB area, H-score and nuclear index of IHC slides (real or virtual)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def readout(
    slides: Annotated[list[str] | None, typer.Argument(
        help="IHC slides: files, globs, directories, or a CSV with `path[,mpp]` rows. Or -w.",
        show_default=False)] = None,
    marker: Annotated[str, typer.Option(
        "--marker", "-m", help="The stain (ki67, er, pr, p53, her2, ...) or a marker model's "
                               "name; Ki67, ER, PR and P53 are nuclear (an index is counted).")]
    = "",
    workspace: Annotated[Path | None, typer.Option(
        "-w", "--workspace", file_okay=False,
        help="Read out the virtual slides the main job stitched in this workspace.")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "-o", "--output", file_okay=False,
        help="Where readout.csv, the heat maps and GeoJSON go; default ./readout, or "
             "WS/readout with -w.")] = None,
    nuclear: Annotated[bool, typer.Option(
        "--nuclear", help="Count nuclei and their positivity even for a marker not known as "
                          "nuclear.")] = False,
    mpp: opt.Mpp = None,
    target_mpp: Annotated[float, typer.Option(
        help="Resolution the tiles are measured at, µm/px (all scanners alike).")] = 0.5,
    tile_size: opt.TileSize = 512,
    workers: Annotated[int | None, typer.Option(
        help="Threads reading and measuring tiles; default: the CPU count.")] = None,
    models_dir: opt.ModelsDir = None,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Read out IHC slides: DAB-positive area, H-score (0-300) and, for nuclear markers, the
    positive-nuclei index, per slide (OUT/readout.csv) and per tile (heat map, GeoJSON)."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.cli.outdir import check_output_folder
        from stainctl.errors import UsageError
        from stainctl.readout.markers import is_nuclear, resolve_marker
        from stainctl.steps.readout import ReadoutOptions, read_out

        if not marker:
            raise UsageError("--marker is required (e.g. --marker ki67)")
        stain = resolve_marker(marker, models_dir)
        if bool(slides) == (workspace is not None):
            raise UsageError("give SLIDES or -w WORKSPACE (one of them)")
        inputs = _inputs(slides or [], workspace, marker, mpp)
        folder = out_dir or (workspace / "readout" if workspace is not None else Path("readout"))
        check_output_folder(folder, "-o")
        options = ReadoutOptions(marker=stain, nuclear=nuclear or is_nuclear(stain), out=folder,
                                 target_mpp=target_mpp, tile_size=tile_size,
                                 workers=workers or os.cpu_count() or 1)
        with out.progress() as progress:
            result, _ = read_out(inputs, options, progress)
        data: dict[str, Any] = {**result.as_dict(), "output": str(folder / "readout.csv")}
        out.emit(data, lambda: _human(result, folder))
        return int(result.exit_code)

    run_command(out, body)


def _inputs(slides: list[str], workspace: Path | None, marker: str,
            mpp: float | None) -> list[Any]:
    from stainctl.steps.readout import ReadoutInput

    if workspace is None:
        from stainctl.slide.inputs import expand_slides

        return [ReadoutInput(name=r.path.stem.split(".")[0], path=r.path, mpp=r.mpp)
                for r in expand_slides(slides, mpp)]
    from stainctl.errors import UsageError
    from stainctl.workspace import Workspace

    ws = Workspace.open(workspace, readonly=True)
    try:
        found = []
        for s in ws.manifest.slides():
            paths = [ws.root / a.path for a in ws.manifest.artifacts(s.id, "stitched")]
            mine = [p for p in paths if f".{marker}." in p.name] or paths
            found += [ReadoutInput(name=p.name.split(".")[0] + "." + p.name.split(".")[1],
                                   path=p, mpp=mpp) for p in mine]
    finally:
        ws.close()
    if not found:
        raise UsageError(f"workspace {workspace} has no stitched virtual slides; run the main "
                         "job (`stainctl translate ... -w WS`) first")
    return found


def _human(result: Any, folder: Path) -> None:
    from stainctl.cli.render import batch_summary

    batch_summary(result)
    csv = folder / "readout.csv"
    if result.slides and len(result.failed) == len(result.slides):
        # The CSV is there but holds its header only: pointing at it would suggest results.
        typer.echo(f"readout: no slide was read out ({csv} has its header only)")
    else:
        typer.echo(f"readout: {csv} (heat maps and GeoJSON beside it)")
