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
# A choice, so a typo stops the command before any work and the shell completes it.
Format = Literal["ome-tiff", "tiff"]
