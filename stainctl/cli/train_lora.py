"""`stainctl train-lora`: adapt an installed model to new IHC images with a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def train_lora(
    marker: Annotated[str, typer.Option("--marker", "-m", help="The stain the adapted model "
                                                              "makes (e.g. ki67, ck7).")],
    engine: Annotated[str, typer.Option(
        help="fast (H&E + IHC images) or pixcell (an IHC workspace).")] = "fast",
    he: Annotated[list[Path] | None, typer.Option(
        "--he", help="fast: H&E slides or images (repeat).")] = None,
    ihc: Annotated[list[Path] | None, typer.Option(
        "--ihc", help="IHC slides or images of the target look (repeat); unpaired. pixcell: "
                      "tiled and filtered into -w first.")] = None,
    workspace: Annotated[Path | None, typer.Option(
        "-w", "--workspace", file_okay=False,
        help="pixcell: the IHC workspace (tiled and filtered at the base model's tile size).")]
    = None,
    base: Annotated[str | None, typer.Option(
        help="The installed model to adapt; default demo-ki67 (fast), pixcell-1024 "
             "(pixcell).")] = None,
    name: Annotated[str | None, opt.new_model_name("lora")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 4.0,
    steps: Annotated[int, typer.Option(help="fast: training steps.")] = 300,
    epochs: Annotated[int, typer.Option(help="pixcell: passes over the tiles.")] = 20,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Crops (fast) or tiles (pixcell) a batch.")]
    = 4,
    accumulate: Annotated[int, typer.Option(
        help="pixcell: batches per optimiser step (gradient accumulation).")] = 1,
    warmup: Annotated[int, typer.Option(help="pixcell: optimiser steps of LR warm-up.")] = 100,
    max_tiles_per_slide: Annotated[int, typer.Option(
        help="pixcell: kept tiles used per slide, at most.")] = 300,
    flow: Annotated[str | None, typer.Option(
        help="pixcell: the model whose flow MLP (H&E -> IHC embeddings) the adapted model "
             "uses, e.g. pixcell-mist-pr as in the CK7 study; none: conditioned on the H&E "
             "embeddings directly.")] = None,
    train_flow: Annotated[bool, typer.Option(
        "--train-flow", help="pixcell: also train a new flow MLP on paired H&E / IHC tiles "
                             "(--paired-he, --paired-ihc).")] = False,
    paired_he: Annotated[Path | None, typer.Option(
        file_okay=False, help="pixcell --train-flow: folder of H&E tiles, paired with "
                              "--paired-ihc by file name (tiles of the base model's size).")]
    = None,
    paired_ihc: Annotated[Path | None, typer.Option(
        file_okay=False, help="pixcell --train-flow: folder of the IHC tiles of the same "
                              "tissue.")] = None,
    flow_epochs: Annotated[int, typer.Option(help="pixcell --train-flow: passes over the "
                                                  "pairs.")] = 100,
    device: Annotated[str, opt.device(" (pixcell)")] = "auto",
    seed: Annotated[int, opt.training_seed("adapter")] = 0,
    default_mpp: Annotated[float | None, opt.default_mpp("; default: refuse them")] = None,
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
    echo = None if (quiet or json_out) else typer.echo

    def body() -> int:
        from stainctl.errors import UsageError
        from stainctl.models.registry import models_dir as resolve_dir

        directory = resolve_dir(models_dir)
        model_name = name or f"{marker}-lora"
        target = output or directory / model_name
        if engine == "fast":
            from stainctl.engines.fast.adapt import AdaptOptions
            from stainctl.models.lora import LoraSpec
            from stainctl.steps.train import adapt_fast

            res = adapt_fast(AdaptOptions(
                name=model_name, marker=marker, base=base or "demo-ki67", he=tuple(he or ()),
                ihc=tuple(ihc or ()), out=target, models_dir=directory,
                lora=LoraSpec(rank=rank, alpha=alpha), steps=steps, lr=lr,
                batch_size=batch_size, seed=seed, default_mpp=default_mpp),
                log=echo is not None)
            data: dict[str, Any] = {"name": model_name, "engine": "fast", "card": str(res.card),
                    "adapter": str(res.adapter), "steps": res.steps,
                    "trainable_parameters": res.trainable, "frozen_parameters": res.frozen,
                    "final_loss": res.final_loss, "loss_curve": str(res.curve)}
        elif engine == "pixcell":
            from stainctl.engines.pixcell.flow_train import FlowTrainOptions
            from stainctl.engines.pixcell.train import PixCellLoraOptions
            from stainctl.steps.train import adapt_pixcell

            flow_options = None
            if train_flow:
                if paired_he is None or paired_ihc is None:
                    raise UsageError("--train-flow needs --paired-he and --paired-ihc")
                flow_options = FlowTrainOptions(paired_he, paired_ihc, flow_epochs, lr,
                                                batch_size, seed)
            if workspace is None:
                raise UsageError("train-lora --engine pixcell needs an IHC workspace (-w); "
                                 "give --ihc slides to tile and filter into it")
            options = PixCellLoraOptions(
                name=model_name, marker=marker, out=target, models_dir=directory,
                base=base or "pixcell-1024", rank=rank, alpha=alpha, epochs=epochs, lr=lr,
                batch_size=batch_size, accumulate=accumulate, warmup=warmup,
                max_tiles_per_slide=max_tiles_per_slide, seed=seed, device=device, flow=flow,
                train_flow=flow_options)
            with out.progress() as progress:
                lora = adapt_pixcell(workspace, list(ihc or []), default_mpp, options, progress,
                                     echo)
            data = {"name": model_name, "engine": "pixcell", "card": str(lora.card),
                    "adapter": str(lora.adapter), "epochs": lora.epochs, "steps": lora.steps,
                    "tiles": lora.tiles, "trainable_parameters": lora.trainable,
                    "frozen_parameters": lora.frozen, "final_loss": lora.final_loss,
                    "loss_curve": str(lora.curve)}
        else:
            raise UsageError(f"--engine must be fast or pixcell, got {engine}")
        out.emit(data, lambda: typer.echo(
            f"{model_name}: {data['trainable_parameters']:,} adapter parameters trained "
            f"({data['frozen_parameters']:,} frozen), final loss {data['final_loss']:.4f} -> "
            f"{Path(data['card']).parent}; use it with `stainctl translate SLIDE --marker "
            f"{model_name}`"))
        return 0

    run_command(out, body)

