"""`stainctl embed`: foundation-model tokens of every kept tile, per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Batch, Output, run_batch


def embed(
    workspace: opt.Workspace,
    encoder: Annotated[str, typer.Option(
        help="Encoder model (see `stainctl models list`), or a card file.")] = "uni2-h",
    models_dir: opt.ModelsDir = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 8,
    device: opt.Device = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, or bf16 (autocast; faster on GPUs and "
                                            "CPUs with bf16 instructions).")] = "fp32",
    readers: Annotated[int, opt.readers("network")] = 2,
    scheduler: opt.Scheduler = None,
    force: opt.Force = False,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Embed every kept tile with a foundation model; float16 arrays per slide (resumable)."""
    def prepare() -> Batch:
        from stainctl.steps.embed import EmbedOptions, embed_slides

        options = EmbedOptions(encoder=encoder, models_dir=Path(models_dir) if models_dir else None,
                               batch_size=batch_size, device=device, dtype=dtype,
                               scheduler=scheduler, readers=readers, force=force)
        return Batch(params=vars(options),
                     step=lambda ws, progress: embed_slides(ws, options, progress))

    run_batch(Output(json_out, quiet, verbose), workspace, "embed", prepare)
