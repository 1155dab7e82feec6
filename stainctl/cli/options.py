"""Options shared by the subcommands, so every command spells them the same way.

An option spelt the same everywhere is an alias (`Json`); one whose help names what it applies
to in each command is a factory giving the option (`device(" (pixcell)")`), used as
`device: Annotated[str, opt.device(...)] = "auto"` so the type stays in the signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from stainctl.cli import complete


def workspace(help: str = "Workspace directory (manifest, tiles, outputs).") -> Any:
    return typer.Option("-w", "--workspace", envvar="STAINCTL_WORKSPACE", file_okay=False,
                        help=help)


def device(note: str = "") -> Any:
    """--device for a command running a network; `note`: which one, or what a device does."""
    return typer.Option(autocompletion=complete.devices, help=f"auto, cpu, cuda or cuda:N{note}.")


def diffusion_dtype(engines: str) -> Any:
    """--dtype of the diffusion `engines` (their own default per device)."""
    return typer.Option(help="auto (bf16 on a GPU, fp32 on a CPU), bf16, fp16 (GPU) or fp32 "
                             f"({engines}).")


def compile_flag(engines: str) -> Any:
    """--compile of the diffusion `engines` (with --no-compile; neither: auto, on a GPU)."""
    return typer.Option("--compile", help="torch.compile the diffusion transformer's blocks on "
                                          f"a CPU too (default: on a GPU only) ({engines}).")


def no_compile_flag(engines: str) -> Any:
    return typer.Option("--no-compile",
                        help="Do not torch.compile the diffusion transformer's blocks (by "
                             "default they are on a GPU: faster after seconds of compiling, "
                             f"and uncompiled if compiling fails) ({engines}).")


def compile_mode(on: bool, off: bool) -> str:
    """EngineOptions.compile of the --compile and --no-compile flags."""
    from stainctl.errors import UsageError

    if on and off:
        raise UsageError("give --compile or --no-compile, not both")
    return "on" if on else "off" if off else "auto"


def tile_seed(engines: str) -> Any:
    """--seed of engines whose noise is drawn per tile."""
    return typer.Option(help="Seed; each tile's noise derives from it, the slide and the tile, so "
                             "re-runs and resumed runs give the same slide "
                             f"({engines}).")


def training_seed(made: str = "model") -> Any:
    return typer.Option(help=f"Seed: the same seed gives the same {made}.")


def new_model_name(suffix: str) -> Any:
    return typer.Option(help=f"Name of the new model; default <marker>-{suffix}.")


def default_mpp(note: str = "") -> Any:
    """--default-mpp of the training commands, which also take PNG/JPEG images."""
    return typer.Option(help=f"µm/px of images that do not record it (PNG, JPEG){note}.")


def readers(consumer: str, note: str = "") -> Any:
    return typer.Option(help=f"Threads reading tiles ahead of the {consumer}{note}.")


def scheduler(help: str = "Address of a running Dask scheduler (tcp://host:8786) whose "
              "workers do the work; default: this machine. Workers must see the slides and "
              "the workspace at the same paths.") -> Any:
    """One spelling, and one variable (cron sets it), for every distributed command."""
    from stainctl.cluster.connect import ENV

    return typer.Option("--scheduler", envvar=ENV, metavar="ADDRESS", help=help)


def pyramid_format(note: str = "") -> Any:
    """--format of a command that writes pyramidal slides (stitch, normalize, the main job)."""
    return typer.Option("--format", help="ome-tiff (pyramid in SubIFDs; QuPath, Bio-Formats) or "
                                         f"tiff (levels as pages; OpenSlide){note}.")


Workspace = Annotated[Path, workspace()]
Json = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document on stdout for scripts.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Print only warnings and errors.")]
Verbose = Annotated[int, typer.Option(
    "-v", "--verbose", count=True, show_default=False,
    help="More detail, with tracebacks of unexpected errors.")]
Force = Annotated[bool, typer.Option("--force", help="Redo everything, even what is done.")]
ModelsDir = Annotated[Path | None, typer.Option(
    "--models-dir", envvar="STAINCTL_MODELS", file_okay=False,
    help="Your models directory (cards and weights); default ~/.local/share/stainctl/models.")]
MaxThumbnailRead = Annotated[float | None, typer.Option(
    "--max-thumbnail-read", metavar="GPX",
    help="Refuse a slide whose thumbnail needs more than this many gigapixels decoded (no "
         "small pyramid level); default 10.")]
# One help for `tile` and the main job: --mpp overrides the metadata of EVERY slide of the
# command, so it is the fix for a slide without a pixel size only when all share one.
Mpp = Annotated[float | None, typer.Option(
    "--mpp",
    help="Pixel size in µm/px for every slide of the command, overriding their metadata (a "
         "CSV's `mpp` column overrides it per slide); for a batch where only some slides lack "
         "one (PNG/JPEG), give those theirs in a CSV `path,mpp` list instead.")]
Scheduler = Annotated[str | None, scheduler()]
# A choice, so a typo stops the command before any work and the shell completes it.
Format = Literal["ome-tiff", "tiff"]
Device = Annotated[str, device()]
TileSize = Annotated[int, typer.Option(help="Tile side in pixels at --target-mpp.")]
