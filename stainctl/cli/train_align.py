"""`stainctl train-align`: HistoStainAlign from paired H&E and IHC serial sections; installs an
align model for `stainctl predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def train_align(
    marker: Annotated[str, typer.Option("--marker", "-m", help="The IHC stain of the pairs "
                                                              "(e.g. ki67).")],
    pair: Annotated[list[str], typer.Option(
        "--pair", metavar="HE,IHC",
        help="An H&E image or slide and the IHC of a serial section, comma-separated (repeat); "
             "registered on landmark CSVs beside them when present.")],
    classes: Annotated[str | None, typer.Option(
        metavar="CLASSES",
        help="Class names between increasing thresholds of --measure of each IHC tile, e.g. "
             "'low<20<high' (a Ki67 index in %); or just names ('low,high') with --labels.")]
    = None,
    measure: Annotated[str | None, typer.Option(
        help="What --classes bins, measured by readout on each registered IHC tile: index "
             "(% positive nuclei), positive-area (% DAB-positive tissue), h-score (0-300), or "
             "dab-mean (mean DAB optical density, for faint or low-resolution images). "
             "Default: index for nuclear markers (ki67, er, pr, p53), else positive-area.")]
    = None,
    labels: Annotated[Path | None, typer.Option(
        dir_okay=False, help="CSV of labels: slide,class rows (a slide's class) and "
                             "slide,x,y,class rows (the tile holding level-0 point x,y).")]
    = None,
    encoder: Annotated[str, typer.Option(
        help="Encoder model that embeds both sides (see `stainctl models list`).")] = "uni2-h",
    pool: Annotated[str, typer.Option(
        help="Slide class from the tiles': mean, max, or attention (trained on the slide "
             "labels).")] = "mean",
    name: Annotated[str | None, opt.new_model_name("align")] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    batch: Annotated[int, typer.Option(help="Tile pairs a step (InfoNCE's negatives).")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-3,
    val: Annotated[float, typer.Option(
        metavar="FRACTION", help="Fraction of each pair's tiles held out for the card's "
                                 "metrics.")] = 0.2,
    seed: Annotated[int, opt.training_seed()] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 50,
    default_mpp: Annotated[float | None, opt.default_mpp("; default: refuse them")] = None,
    device: Annotated[str, opt.device(" (the encoder)")] = "auto",
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", "--out", file_okay=False,
        help="Model folder (and its resumable run/); default <models dir>/<name>. The model "
             "is installed in the models directory either way.")] = None,
    models_dir: opt.ModelsDir = None,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Train HistoStainAlign heads from paired H&E/IHC sections: InfoNCE-aligned projections,
    a patch head for the IHC pattern class and slide pooling; writes and installs the model
    (card with its metrics) for `stainctl predict`. Resumes after a kill."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.align.data import ClassBins
        from stainctl.errors import UsageError
        from stainctl.steps.align import AlignOptions
        from stainctl.steps.align import train_align as run

        pairs = []
        for text in pair:
            parts = text.split(",")
            if len(parts) != 2 or not all(parts):
                raise UsageError(f"--pair takes HE,IHC (two paths, comma-separated), got "
                                 f"{text!r}")
            pairs.append((Path(parts[0]), Path(parts[1])))
        options = AlignOptions(
            marker=marker, pairs=tuple(pairs), encoder=encoder,
            classes=ClassBins.parse(classes) if classes else None, measure=measure or "",
            labels=labels, pool=pool, name=name or "", out=output,
            models_dir=Path(models_dir) if models_dir else None, steps=steps, batch=batch,
            lr=lr, seed=seed, val=val, checkpoint_every=checkpoint_every,
            default_mpp=default_mpp, device=device)
        with out.progress() as progress:
            res = run(options, progress)
        m, t = res.metrics, res.metrics.tiles
        data = {"name": res.name, "card": str(res.card), "folder": str(res.folder),
                "tiles": res.tiles, "steps": res.steps,
                "final_loss": res.history[-1]["loss"] if res.history else None,
                "metrics": m.as_dict()}
        out.emit(data, lambda: typer.echo(
            f"{res.name}: {res.tiles} tile pairs, {res.steps} steps; paired retrieval "
            f"{m.retrieval_top1:.2f} (chance {m.retrieval_chance:.2f}); tile weighted F1 "
            f"{t.weighted_f1:.2f} [{t.f1_ci[0]:.2f}, {t.f1_ci[1]:.2f}] on {t.n} "
            f"{m.evaluated_on} -> {res.folder}; use it with `stainctl predict -w WS --model "
            f"{res.name}`"))
        return 0

    run_command(out, body)
