"""Subcommands whose capability is not built yet: they say so and exit 2, never pretend."""

from __future__ import annotations

from collections.abc import Callable

import typer

PLANNED = {
    "train-lora": "LoRA adaptation of a generator to a new marker from unpaired IHC tiles",
}


def make(name: str, what: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        from stainctl import __version__

        typer.echo(f"error: `stainctl {name}` ({what}) is not built yet in stainctl "
                   f"{__version__}; nothing was done.", err=True)
        raise typer.Exit(2)

    command.__doc__ = f"(not built yet) {what[0].upper()}{what[1:]}."
    return command
