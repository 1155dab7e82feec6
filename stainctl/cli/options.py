"""Options shared by the subcommands, so every command spells them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

Workspace = Annotated[Path, typer.Option(
    "-w", "--workspace", envvar="STAINCTL_WORKSPACE", file_okay=False,
    help="Workspace directory (manifest, tiles, outputs).")]
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
# One spelling for every distributed command (filter, embed, translate); cron sets the variable.
Scheduler = Annotated[str | None, typer.Option(
    "--scheduler", envvar="STAINCTL_SCHEDULER", metavar="ADDRESS",
    help="Address of a running Dask scheduler (tcp://host:8786) whose workers do the work; "
         "default: this machine. Workers must see the slides and the workspace at the same "
         "paths.")]
# A choice, so a typo stops the command before any work and the shell completes it.
Format = Literal["ome-tiff", "tiff"]
