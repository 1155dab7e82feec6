"""`stainctl translate`: H&E slides -> virtual IHC slides (the main job), or, on a workspace,
the translation step alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stainctl.cli import complete
from stainctl.cli import options as opt
from stainctl.cli.options import Format
from stainctl.cli.output import Batch, Output, run_batch

if TYPE_CHECKING:
    from stainctl.steps.translate import TranslateOptions


def translate(
    ctx: typer.Context,
    slides: Annotated[list[str] | None, typer.Argument(
        help="Slides to take through tile, filter, translate and stitch; none: translate the "
             "filtered slides of -w.")] = None,
    marker: Annotated[str, typer.Option(
        "--marker", "-m", autocompletion=complete.markers,
        help="A marker model (e.g. demo-ki67), or a stain with an installed model (e.g. ki67).")]
    = "demo-ki67",
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Where the slides and side-by-side PNGs go (with SLIDES).")]
    = Path("stainctl-out"),
    workspace: Annotated[Path | None, opt.workspace(
        "Workspace; default with SLIDES: OUTPUT/workspace.")] = None,
    models_dir: opt.ModelsDir = None,
    device: opt.Device = "auto",
    batch_size: Annotated[int | None, typer.Option(
        help="Tiles per forward pass; default 8, 64 for the fast engine on a GPU.")] = None,
    readers: Annotated[int | None, opt.readers(
        "model", "; default 2, up to 8 on a GPU")] = None,
    fmt: Annotated[Format, opt.pyramid_format("; with SLIDES")] = "ome-tiff",
    mpp: opt.Mpp = None,
    steps: Annotated[int | None, typer.Option(
        help="Diffusion steps: default 20 (pixcell), 100 translation steps (histdist).")]
    = None,
    sampler: Annotated[str, typer.Option(
        help="Diffusion solver (pixcell): dpm++ (the model's own DPM-Solver++ 2M), "
             "dpm++-karras or unipc, which keep more quality at few steps (--steps 8; "
             "the cost against 20 steps is unmeasured).")] = "dpm++",
    guidance: Annotated[float, typer.Option(
        help="Classifier-free guidance scale (pixcell); <= 1 skips the unconditional "
             "pass.")] = 1.2,
    seed: Annotated[int, opt.tile_seed("pixcell, histdist")] = 0,
    dtype: Annotated[str, opt.diffusion_dtype(
        "pixcell, histdist; the fast engine: auto is fp32")] = "auto",
    compile_on: Annotated[bool, opt.compile_flag("pixcell")] = False,
    compile_off: Annotated[bool, opt.no_compile_flag("pixcell")] = False,
    inversion_steps: Annotated[int | None, typer.Option(
        help="DDIM inversion steps (histdist; default 100).")] = None,
    eta: Annotated[str | None, typer.Option(
        help="η schedule of the denoising: zero, constant, linear, cosine-10, cosine-20, "
             "cosine-30 or a number (histdist default cosine-20, 0.6 - 0.4 cos(πx); "
             "pixcell --structure default zero).")] = None,
    inversion_eta: Annotated[str, typer.Option(
        help="η schedule of the inversion (histdist).")] = "zero",
    prediction_type: Annotated[str | None, typer.Option(
        help="What the UNet predicts: v_prediction (published) or epsilon (histdist).")]
    = None,
    latent_norm: Annotated[str, typer.Option(
        help="Standardise the inverted latent per channel: inversion (at its end, "
             "published), steps (after every step) or none (histdist).")] = "inversion",
    structure: Annotated[float | None, typer.Option(
        help="pixcell: invert the H&E tile's latent up to this fraction of the schedule and "
             "denoise from there (HistDiST's recipe; 0 < S <= 1, small keeps more of the "
             "H&E; 1 is ordinary generation; costs S x --steps extra passes).")] = None,
    overlap: Annotated[int | None, typer.Option(
        help="Context px on each side of a tile, blended by stitch; default: the model's "
             "(32 fast, 64 pixcell, 32 histdist).")] = None,
    normalize_to: Annotated[Path | None, typer.Option(
        help="Normalise each tile to this reference's stain (an H&E image or slide) before "
             "the model sees it; default: the reference the model's card names, if any.")]
    = None,
    normalize_method: Annotated[str, typer.Option(
        help="macenko or reinhard (with --normalize-to).")] = "macenko",
    max_thumbnail_read: opt.MaxThumbnailRead = None,
    scheduler: opt.Scheduler = None,
    devices: Annotated[str | None, typer.Option(
        metavar="LIST",
        help="Start one local worker per device and spread the slides over them: cuda:0,cuda:1, "
             "all (every GPU) or cpu,cpu.")] = None,
    shard_tiles: Annotated[int, typer.Option(
        help="Tiles per task on a cluster (--scheduler, --devices): a large slide is split so "
             "that every worker has work.")] = 256,
    readout: Annotated[bool, typer.Option(
        "--readout", help="Then read out the virtual slides (`stainctl readout`) into "
                          "OUTPUT/readout and put the index in the summary (with SLIDES).")]
    = False,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Generate a virtual IHC slide from each H&E slide (or translate a workspace's tiles)."""
    out = Output(json_out, quiet, verbose)
    if not slides and workspace is None:
        out.error("give slides, or a workspace with -w to translate its filtered tiles")
        raise typer.Exit(2)
    if not slides:
        _refuse_main_job_options(ctx, out)

    def translate_options() -> TranslateOptions:
        from stainctl.cluster.local import Devices
        from stainctl.steps.translate import TranslateOptions

        return TranslateOptions(
            marker=marker, models_dir=Path(models_dir) if models_dir else None, device=device,
            batch_size=batch_size, readers=readers, force=force, steps=steps, guidance=guidance,
            seed=seed, dtype=dtype, overlap=overlap, sampler=sampler, scheduler=scheduler,
            devices=Devices.parse(devices) if devices else None, shard_tiles=shard_tiles,
            normalize_to=normalize_to, normalize_method=normalize_method,
            inversion_steps=inversion_steps, eta=eta, inversion_eta=inversion_eta,
            prediction=prediction_type, latent_norm=latent_norm, structure=structure,
            compile=opt.compile_mode(compile_on, compile_off))


    def step_alone() -> Batch:
        from stainctl.steps.translate import translate_slides

        options = translate_options()
        return Batch(params=vars(options),
                     step=lambda ws, progress: translate_slides(ws, options, progress))

    def main_job() -> Batch:
        from stainctl.cli.outdir import check_output_folder
        from stainctl.slide.inputs import expand_slides
        from stainctl.steps.pipeline import run_main_job
        from stainctl.stitch.pyramid import PyramidOptions

        check_output_folder(output, "-o")
        options = translate_options()
        pyramid = PyramidOptions(format=fmt)
        requests = expand_slides(slides or [], mpp)
        return Batch(params={"slides": slides, **vars(options)},
                     step=lambda ws, progress: run_main_job(
                         ws, requests, options, output.resolve(), pyramid, progress,
                         max_thumbnail_read=max_thumbnail_read, readout=readout))

    if not slides:
        assert workspace is not None
        run_batch(out, workspace, "translate", step_alone)
    run_batch(out, workspace or output / "workspace", "translate", main_job, create=True)


# Options only the main job (with SLIDES) uses; with -w alone they were silently ignored, and
# `translate -w WS -o DIR` left DIR empty.
MAIN_JOB_ONLY = {"output": "-o", "fmt": "--format", "readout": "--readout", "mpp": "--mpp",
                 "max_thumbnail_read": "--max-thumbnail-read"}


def _refuse_main_job_options(ctx: typer.Context, out: Output) -> None:
    # By the enum member's name: typer versions differ in whose click (vendored or not) it is.
    given = [flag for name, flag in MAIN_JOB_ONLY.items()
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]
    if given:
        out.error(f"{', '.join(given)}: only for the main job (with SLIDES); without SLIDES, "
                  "translate only fills the tile stores of -w, then `stainctl stitch -w WS -o "
                  "DIR` writes the slides and `stainctl readout -w WS` reads them out")
        raise typer.Exit(2)
