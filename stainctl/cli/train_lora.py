"""`stainctl train-lora`: adapt an installed model to new IHC images with a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def train_lora(
    marker: Annotated[str, typer.Option("--marker", "-m", help="The stain the adapted model "
                                                              "makes (e.g. ki67, ck7).")],
    he: Annotated[list[Path], typer.Option("--he", help="H&E slides or images (repeat).")],
    ihc: Annotated[list[Path], typer.Option("--ihc", help="IHC slides or images of the target "
                                                          "look (repeat); unpaired.")],
    engine: Annotated[str, typer.Option(help="fast (built) or pixcell (not built yet).")]
    = "fast",
    base: Annotated[str, typer.Option(help="The installed model to adapt.")] = "demo-ki67",
    name: Annotated[str | None, typer.Option(
        help="Name of the new model; default <marker>-lora.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 4.0,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    lr: Annotated[float, typer.Option(help="Learning rate (Adam).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Crops per step.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same adapter.")] = 0,
    default_mpp: Annotated[float | None, typer.Option(
        help="µm/px of images that do not record it (PNG, JPEG).")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", file_okay=False,
        help="Model folder; default <models dir>/<name>, so translate can use it at once.")]
    = None,
    models_dir: opt.ModelsDir = None,
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = 0,
) -> None:
    """Adapt a model to a new marker or site with LoRA on unpaired IHC images; writes a model
    card, the adapter, the loss history and a loss curve. Resumes after a kill."""
    out = Output(json_out, quiet, verbose)

    def body() -> int:
        from stainctl.errors import UsageError

        if engine != "fast":
            raise UsageError(f"train-lora --engine {engine} is not built yet in this version; "
                             "--engine fast adapts a fast model")
        from stainctl.engines.fast.adapt import AdaptOptions, adapt
        from stainctl.models.lora import LoraSpec
        from stainctl.models.registry import models_dir as resolve_dir

        directory = resolve_dir(models_dir)
        model_name = name or f"{marker}-lora"
        options = AdaptOptions(
            name=model_name, marker=marker, base=base, he=tuple(he), ihc=tuple(ihc),
            out=output or directory / model_name, models_dir=directory,
            lora=LoraSpec(rank=rank, alpha=alpha), steps=steps, lr=lr, batch_size=batch_size,
            seed=seed, default_mpp=default_mpp)
        res = adapt(options, log=not (quiet or json_out))
        data = {"name": model_name, "card": str(res.card), "adapter": str(res.adapter),
                "steps": res.steps, "trainable_parameters": res.trainable,
                "frozen_parameters": res.frozen, "final_loss": res.final_loss,
                "loss_curve": str(res.curve)}
        out.emit(data, lambda: typer.echo(
            f"{model_name}: {res.steps} steps, {res.trainable:,} adapter parameters trained "
            f"({res.frozen:,} frozen) -> {res.card.parent}; use it with "
            f"`stainctl translate SLIDE --marker {model_name}`"))
        return 0

    run_command(out, body)
