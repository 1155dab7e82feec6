"""`stainctl predict`: an align model's IHC pattern class per tile and per slide, from H&E."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Batch, Output, run_batch

if TYPE_CHECKING:
    from stainctl.steps.predict import PredictOptions
    from stainctl.steps.report import BatchResult
    from stainctl.workspace import Workspace


def predict(
    workspace: opt.Workspace,
    model: Annotated[str, typer.Option(
        "--model", help="An align model (made by `stainctl train-align`).")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", "--out", file_okay=False,
        help="Folder for predict.<model>.csv and each slide's GeoJSON and heat-map PNG; "
             "default WS/outputs.")] = None,
    models_dir: opt.ModelsDir = None,
    batch_size: Annotated[int, typer.Option(
        help="Tiles per forward pass of the encoder (slides not embedded yet).")] = 8,
    device: Annotated[str, opt.device(" (the encoder)")] = "auto",
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Predict the IHC pattern class of every kept tile and of each slide from its H&E tokens
    (embedding the slides first when needed): a CSV row per slide, GeoJSON, heat-map PNG."""
    def prepare() -> Batch:
        from stainctl.steps.predict import PredictOptions, predict_slides

        options = PredictOptions(model=model, out=output,
                                 models_dir=Path(models_dir) if models_dir else None,
                                 device=device, batch_size=batch_size)
        return Batch(params=vars(options),
                     step=lambda ws, progress: predict_slides(ws, options, progress),
                     after=lambda ws, result: _where(ws, options, result))

    run_batch(Output(json_out, quiet, verbose), workspace, "predict", prepare)


def _where(ws: Workspace, options: PredictOptions, result: BatchResult) -> None:
    from stainctl.steps.predict import csv_path

    done = [s for s in result.slides if s.state == "done"]
    if done:
        folder = options.out or ws.root / "outputs"
        typer.echo(f"slide classes in {csv_path(folder, str(done[0].details['model']))}; "
                   f"GeoJSON and heat-maps beside it")
