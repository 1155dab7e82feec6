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
    real: Annotated[Path | None, typer.Option(
        "--real", "-r", help="Real IHC: a folder of images, a slide, or a workspace (its "
                             "kept tiles).")] = None,
    fake: Annotated[list[Path] | None, typer.Option(
        "--fake", "-f", help="Generated images, as for --real; a workspace gives its translated "
                             "--marker tiles. Repeat to compare and rank several.")] = None,
    readout: Annotated[list[Path] | None, typer.Option(
        "--readout", dir_okay=False,
        help="Instead of --real/--fake: two per-slide CSVs (readout.csv, predict.<model>.csv, "
             "a lab's table; rows matched on 'slide'), given as --readout A --readout B: "
             "agreement of B with A on every column both have (numbers: Pearson/Spearman r, "
             "Bland-Altman bias and limits; classes: weighted F1 with a bootstrap 95 % CI, "
             "per-class recall).")] = None,
    marker: Annotated[str | None, typer.Option(
        "--marker", "-m", help="Whose translated tiles a --fake workspace gives, and whose "
        "virtual slides a --fake folder of stitched slides (the main job's OUTPUT) gives.")]
    = None,
    metrics: Annotated[str | None, typer.Option(
        autocompletion=complete.metrics,
        help="Comma-separated: fid, cropfid, kid, encoder, stain, paired, seams, colour (Lab "
             "mean/spread and H&E stain vectors of the tissue, distances to --real), mra "
             "(HistDiST's retrieval accuracy of pairs, needs --encoder); each must run. "
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
    SSIM/PSNR (registered on landmarks), seams; rank several generated sets. With two --readout
    CSVs: the agreement of two per-slide readouts."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.errors import UsageError

        if readout:
            if len(readout) != 2 or real is not None or fake:
                raise UsageError("--readout takes exactly two CSVs (--readout A --readout B), "
                                 "without --real/--fake")
            from stainctl.evaluate.readouts import compare_readouts

            agreement = compare_readouts(readout[0], readout[1])
            out.emit(agreement, lambda: _agreement(agreement))
            return 0
        if real is None or not fake:
            raise UsageError("evaluate needs --real and --fake (images, slides or workspaces), "
                             "or two --readout CSVs")
        if report is not None:  # before the metrics, which may take long
            from stainctl.cli.outdir import check_output_folder

            check_output_folder(report, "--report")
        from stainctl.evaluate.evaluator import DEFAULT_METRICS, EvaluateOptions
        from stainctl.evaluate.evaluator import evaluate as run
        from stainctl.evaluate.sources import SourceOptions

        options = EvaluateOptions(
            real=real, fakes=tuple(fake),
            metrics=DEFAULT_METRICS if metrics is None else tuple(
                m.strip() for m in metrics.split(",") if m.strip()),
            strict=metrics is not None,
            seeds=seeds, crops=crops, crop_size=crop_size, max_images=max_images,
            source=SourceOptions(tile_size, tile_mpp, min_tissue,
                                 _model_name(marker, models_dir)),
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


def _agreement(data: dict[str, Any]) -> None:
    typer.echo(f"{data['slides']} slides in both {data['a']} (A) and {data['b']} (B)"
               + (f"; only in A: {len(data['only_in_a'])}" if data["only_in_a"] else "")
               + (f"; only in B: {len(data['only_in_b'])}" if data["only_in_b"] else ""))
    for col, v in data["values"].items():
        # A figure that cannot be had from n slides is left out and `missing` says why.
        parts = [f"n={v['n']}"]
        if v["pearson_r"] is not None:
            parts.append(f"Pearson r={v['pearson_r']:.3f}  Spearman r={v['spearman_r']:.3f}")
        if v["bland_altman_bias"] is not None:
            parts.append(f"bias (B-A)={v['bland_altman_bias']:.4g}  mean |B-A|="
                         f"{v['mean_abs_difference']:.4g}")
        if v["bland_altman_loa95"] is not None:
            lo, hi = v["bland_altman_loa95"]
            parts.append(f"limits [{lo:.4g}, {hi:.4g}]")
        if v["missing"]:
            parts.append(f"({v['missing']})")
        typer.echo(f"  {col}: " + "  ".join(parts))
    for col, c in data["classes"].items():
        lo, hi = c["weighted_f1_ci95"]
        recall = ", ".join(f"{k} {r:.2f}" for k, r in c["recall"].items())
        typer.echo(f"  {col}: n={c['n']}  weighted F1={c['weighted_f1']:.3f} [{lo:.3f}, "
                   f"{hi:.3f}]  accuracy={c['accuracy']:.3f}  recall: {recall}")


def _human(data: dict[str, Any]) -> None:
    from stainctl.cli.render import metrics_table

    metrics_table(data)


def _model_name(marker: str | None, models_dir: Path | None) -> str | None:
    """--marker as translate reads it: a stain (`ki67`) means the model that makes it, whose
    name a workspace's stores and the stitched slides carry. A name no card knows stays as
    given (a workspace made with a model not installed here)."""
    if not marker:
        return marker
    from stainctl.errors import StainctlError
    from stainctl.models.lookup import marker_card
    from stainctl.models.registry import models_dir as directory

    try:
        return marker_card(marker, directory(models_dir)).name
    except StainctlError:
        return marker
