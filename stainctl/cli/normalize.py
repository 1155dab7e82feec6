"""`stainctl normalize`: H&E slides brought to a reference's stain (Macenko, Reinhard or the
learned StainFuser), through the main job's tile -> filter -> normalise -> stitch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from stainctl.cli import options as opt
from stainctl.cli.options import Format
from stainctl.cli.output import Batch, Output, run_batch

Method = Literal["macenko", "reinhard", "stainfuser"]


def normalize(
    slides: Annotated[list[str], typer.Argument(help="Slides to normalise.")],
    target: Annotated[Path, typer.Option(
        "--target", "-t", help="The reference: an H&E image (used whole) or slide (its tissue "
                               "tiles are sampled) whose stain the slides take.")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Where <slide>.normalised.ome.tiff and the side-by-side PNGs "
                               "(source | normalised | target) go.")] = Path("stainctl-out"),
    method: Annotated[Method, typer.Option(
        help="macenko or reinhard (torchstain; fitted once per slide, on a CPU), or stainfuser "
             "(the learned diffusion normaliser; GPU-class, needs its weights).")] = "macenko",
    model: Annotated[str, typer.Option(
        help="The learned normaliser's model (--method stainfuser): its card name.")]
    = "stainfuser",
    workspace: Annotated[Path | None, opt.workspace(
        "Workspace; default OUTPUT/workspace.")] = None,
    target_mpp: Annotated[float, typer.Option(
        help="µm/px of the tiles and of the output (stainfuser takes 0.5).")] = 0.5,
    tile_size: Annotated[int, typer.Option(
        help="Tile px a side (classical methods; stainfuser takes its model's).")] = 512,
    fmt: Annotated[Format, opt.pyramid_format()] = "ome-tiff",
    mpp: opt.Mpp = None,
    scheduler: Annotated[str | None, opt.scheduler(
        "Address of a running Dask distributed scheduler for the tile filter; default: "
        "local threads.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Local threads of the filter (default: one per core).")] = None,
    device: Annotated[str, opt.device(" (stainfuser)")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Tiles per batch.")] = 8,
    steps: Annotated[int, typer.Option(help="Denoising steps (stainfuser).")] = 20,
    seed: Annotated[int, opt.tile_seed("stainfuser")] = 0,
    dtype: Annotated[str, opt.diffusion_dtype("stainfuser")] = "auto",
    overlap: Annotated[int | None, typer.Option(
        help="Context px on each side of a tile, blended by stitch (stainfuser; default 32). "
             "The classical methods map each colour alike everywhere and need none.")] = None,
    models_dir: opt.ModelsDir = None,
    max_thumbnail_read: opt.MaxThumbnailRead = None,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Bring each H&E slide to the stain of a reference image or slide."""
    out = Output(json_out, quiet, verbose)

    def job() -> Batch:
        from stainctl.cli.outdir import check_output_folder
        from stainctl.slide.inputs import expand_slides
        from stainctl.steps.normalize import NormalizeOptions, run_normalize_job
        from stainctl.stitch.pyramid import PyramidOptions

        options = NormalizeOptions(
            target=target, method=method, model=model,
            models_dir=Path(models_dir) if models_dir else None,
            target_mpp=target_mpp, tile_size=tile_size, device=device, batch_size=batch_size,
            steps=steps, seed=seed, dtype=dtype, overlap=overlap, scheduler=scheduler,
            workers=workers, force=force)
        pyramid = PyramidOptions(format=fmt)
        check_output_folder(output, "-o")
        requests = expand_slides(slides, mpp)
        return Batch(params={"slides": slides, **{k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(options).items()}},
                     step=lambda ws, progress: run_normalize_job(
                         ws, requests, options, output.resolve(), pyramid, progress,
                         max_thumbnail_read=max_thumbnail_read))

    run_batch(out, workspace or output / "workspace", "normalize", job, create=True)
