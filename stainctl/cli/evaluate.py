"""`stainctl evaluate`: generated against real images; distribution, stain, paired, seam
metrics and a QC report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stainctl.cli import complete
from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def evaluate(
    real: Annotated[Path, typer.Option(
        "--real", "-r", help="Real IHC: a folder of images, a slide, or a workspace (its "
                             "kept tiles).")],
    fake: Annotated[list[Path], typer.Option(
        "--fake", "-f", help="Generated images, as for --real; a workspace gives its translated "
                             "--marker tiles. Repeat to compare and rank several.")],
    marker: Annotated[str | None, typer.Option(
        "--marker", "-m", help="Whose translated tiles a --fake workspace gives.")] = None,
    metrics: Annotated[str | None, typer.Option(
        autocompletion=complete.metrics,
        help="Comma-separated: fid, cropfid, kid, encoder, stain, paired, seams, mra; each "
             "must run (mra: HistDiST's retrieval accuracy of pairs, needs --encoder). "
             "Default: fid, cropfid, kid, stain, paired, seams, leaving out (and listing) those "
             "that cannot run here, such as FID without its Inception weights.")] = None,
    seeds: Annotated[int, typer.Option(help="Crop seeds for CropFID and KID (mean ± std).")] = 5,
    crops: Annotated[int, typer.Option(help="Random crops per tile for CropFID/KID.")] = 4,
    crop_size: Annotated[int, typer.Option(help="Crop side in pixels.")] = 256,
    max_images: Annotated[int | None, typer.Option(
        help="At most this many images per set (a seeded, deterministic choice); default: "
             "as many as the smallest set has.")] = None,
    tile_size: Annotated[int, typer.Option(
        help="Side of the tiles sampled from slides, in pixels.")] = 1024,
    tile_mpp: Annotated[float | None, typer.Option(
        help="Resolution (µm/px) of tiles sampled from slides; default: each slide's own.")]
    = None,
    min_tissue: Annotated[float, typer.Option(
        help="Least tissue fraction of a tile sampled from a slide.")] = 0.5,
    inception_weights: Annotated[Path | None, typer.Option(
        help="The FID Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth); "
             "default: the torch hub cache.", dir_okay=False)] = None,
    encoder: Annotated[str | None, typer.Option(
        help="Also compare in this encoder's space (e.g. uni2-h): Fréchet distance, cosine; "
             "the encoder of mra (gigapath as in HistDiST).")]
    = None,
    pairs: Annotated[Path | None, typer.Option(
        help="CSV of real,fake pairs (keys or image paths); default: images with the same "
             "name.", dir_okay=False)] = None,
    no_register: Annotated[bool, typer.Option(
        "--no-register", help="Compare pairs as they are, even where landmark CSVs exist.")]
    = False,
    dab_threshold: Annotated[float, typer.Option(
        help="DAB optical density above which a pixel counts as DAB-positive.")] = 0.15,
    report: Annotated[Path | None, typer.Option(
        help="Write a QC report here: metrics.json, index.html and PNG figures.",
        file_okay=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per feature-network batch.")] = 16,
    device: Annotated[str, typer.Option(
        autocompletion=complete.devices, help="auto, cpu or cuda.")] = "auto",
    models_dir: opt.ModelsDir = None,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Compare generated images with real ones: FID, CropFID, KID, DAB stain metrics, paired
    SSIM/PSNR (registered on landmarks), seams; rank several generated sets."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.evaluate.evaluator import DEFAULT_METRICS, EvaluateOptions
        from stainctl.evaluate.evaluator import evaluate as run
        from stainctl.evaluate.sources import SourceOptions

        options = EvaluateOptions(
            real=real, fakes=tuple(fake),
            metrics=DEFAULT_METRICS if metrics is None else tuple(
                m.strip() for m in metrics.split(",") if m.strip()),
            strict=metrics is not None,
            seeds=seeds, crops=crops, crop_size=crop_size, max_images=max_images,
            source=SourceOptions(tile_size, tile_mpp, min_tissue, marker),
            inception_weights=inception_weights, encoder=encoder, models_dir=models_dir,
            pairs_csv=pairs, register=not no_register, dab_threshold=dab_threshold,
            batch_size=batch_size, device=device)
        with out.progress() as progress:
            evaluation = run(options, progress)
            html = None
            if report is not None:
                from stainctl.evaluate.report import write_report

                html = write_report(evaluation, report)
        data = evaluation.to_json()
        if html is not None:
            data["report"] = str(html)
        out.emit(data, lambda: _human(data))
        return 1 if any(f.get("error") for f in data["fakes"]) else 0

    run_command(out, body)


def _human(data: dict[str, Any]) -> None:
    from stainctl.cli.render import metrics_table

    metrics_table(data)
