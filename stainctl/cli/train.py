"""`stainctl train`: a fast model from scratch, installed so `translate --marker NAME` uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import complete
from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def train(
    marker: Annotated[str, typer.Option("--marker", "-m", help="The stain the model makes "
                                                              "(e.g. ki67).")],
    he: Annotated[list[Path], typer.Option(
        "--he", help="H&E slides or images (repeat).")],
    ihc: Annotated[list[Path], typer.Option(
        "--ihc", help="IHC slides or images of the stain (repeat); unpaired.")],
    pair: Annotated[list[str] | None, typer.Option(
        "--pair", metavar="HE,IHC",
        help="A roughly aligned H&E / IHC pair of serial sections, comma-separated (repeat); "
             "registered on landmark CSVs beside them when present.")] = None,
    name: Annotated[str | None, opt.new_model_name("fast")] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 2000,
    batch: Annotated[int, typer.Option(help="Crops a step.")] = 4,
    crop: Annotated[int, typer.Option(help="Crop side in px, at 0.5 µm/px.")] = 256,
    hold_out: Annotated[float, typer.Option(
        "--hold-out", metavar="FRACTION",
        help="Keep about this fraction of each IHC image (a right-hand strip) out of training; "
             "its crops go to OUT/held_out/ for `stainctl evaluate --real`.")] = 0.0,
    validation: Annotated[float, typer.Option(
        "--validation", metavar="FRACTION",
        help="Also keep about this fraction of the rest of each IHC image (a bottom strip) out "
             "of training; its crops go to OUT/validation/, to choose checkpoints on without "
             "touching the held-out crops.")] = 0.0,
    seed: Annotated[int, opt.training_seed()] = 0,
    default_mpp: Annotated[float, opt.default_mpp()] = 0.5,
    device: Annotated[str, opt.device("; a CUDA run uses deterministic kernels")] = "auto",
    loss_weight: Annotated[list[str] | None, typer.Option(
        "--loss-weight", metavar="NAME=VALUE",
        help="Set one loss weight (repeat): adv 1, identity 5, structure 10, dab 2 (DAB mean "
             "and spread), dab_tail 10 (top-decile DAB and DAB-positive area), dab_upper 20 "
             "(the sorted top 3 % of DAB, rank by rank), haematoxylin "
             "10 (counterstain of DAB-negative tissue), nuclear (DAB outside nuclei-shaped "
             "structures; 20 for nuclear markers such as ki67, else 0), background 5 (colour "
             "of non-nuclear tissue), off_stain 200 (colour no haematoxylin-DAB mix makes), "
             "nuclei_colour 0 and tissue_colour 0 (colour distributions of nuclei and of "
             "other tissue; 30 and 20 give blue nuclei, some brown), glass 25, lowres 10 and "
             "fm 1 (pairs only).")] = None,
    init: Annotated[str | None, typer.Option(
        "--init", metavar="MODEL", autocompletion=complete.markers,
        help="Start from the generator weights of this installed fast model (e.g. demo-ki67) "
             "instead of from scratch; the card records it.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", "--out", file_okay=False,
        help="Model folder (resumable run, held-out crops); default <models dir>/<name>. "
             "The model is installed in the models directory either way.")] = None,
    models_dir: opt.ModelsDir = None,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Train a fast model from unpaired H&E and IHC images (and optional aligned pairs); writes
    its card, weights, loss history and curve, and installs it. Resumes after a kill."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.errors import UsageError
        from stainctl.steps.train import FastTrainOptions, train_fast_model

        pairs = []
        for text in pair or []:
            parts = text.split(",")
            if len(parts) != 2 or not all(parts):
                raise UsageError(f"--pair takes HE,IHC (two paths, comma-separated), got "
                                 f"{text!r}")
            pairs.append((Path(parts[0]), Path(parts[1])))
        weights = []
        for text in loss_weight or []:
            key, eq, value = text.partition("=")
            try:
                weights.append((key.strip(), float(value)))
            except ValueError:
                eq = ""
            if not eq:
                raise UsageError(f"--loss-weight takes NAME=VALUE (e.g. nuclear=20), got "
                                 f"{text!r}") from None
        res = train_fast_model(FastTrainOptions(
            marker=marker, he=tuple(he), ihc=tuple(ihc), pairs=tuple(pairs), name=name or "",
            out=output, models_dir=Path(models_dir) if models_dir else None, steps=steps,
            batch=batch, crop=crop, seed=seed, default_mpp=default_mpp, hold_out=hold_out,
            validation=validation, device=device, loss_weights=tuple(weights), init=init or ""),
            log=not (quiet or json_out))
        data = {"name": res.name, "engine": "fast", "card": str(res.card),
                "folder": str(res.folder), "steps": res.steps, "parameters": res.parameters,
                "final_loss": res.final_loss, "held_out": res.held_out,
                "validation": res.validation}
        out.emit(data, lambda: typer.echo(
            f"{res.name}: {res.steps} steps, {res.parameters / 1e6:.2f} M parameters, final "
            f"loss {res.final_loss:.4f} -> {res.folder}"
            + (f" ({res.held_out} held-out crops in held_out/)" if res.held_out else "")
            + (f" ({res.validation} validation crops in validation/)" if res.validation else "")
            + f"; use it with `stainctl translate SLIDE --marker {res.name}`"))
        return 0

    run_command(out, body)
