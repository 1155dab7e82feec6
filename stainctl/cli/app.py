"""The `stainctl` Typer app. Only light imports here: `stainctl --help` must stay instant
(no torch, dask, pyvips or numpy at start-up; checked by a test)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from stainctl import __version__
from stainctl.cli import (
    cluster,
    embed,
    evaluate,
    models,
    normalize,
    predict,
    readout,
    status,
    stitch,
    tile,
    train,
    train_align,
    train_lora,
    translate,
)
from stainctl.cli import filter as filter_cmd
from stainctl.cli.help import help_command, use_plain_help

app = typer.Typer(
    name="stainctl",
    help="Turn H&E whole-slide images into virtual IHC slides, in batches.\n\n"
         "Steps share one workspace (-w DIR): tile -> filter -> embed -> translate -> stitch "
         "-> evaluate; normalize brings slides to a reference's stain. Exit codes: 0 all done, "
         "1 some slides failed (the others finished) or the disk filled (finished work is "
         "kept), "
         "2 usage error, 130/143 stopped by Ctrl-C/SIGTERM (the same command resumes).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: see cli/help.py
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stainctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")]
    = False,
) -> None:
    """Turn H&E whole-slide images into virtual IHC slides, in batches."""


# In pipeline order, so `--help` reads like the workflow.
COMMANDS: dict[str, Callable[..., None]] = {
    "tile": tile.tile, "filter": filter_cmd.filter_tiles, "normalize": normalize.normalize,
    "embed": embed.embed,
    "train": train.train, "train-lora": train_lora.train_lora, "translate": translate.translate,
    "stitch": stitch.stitch, "evaluate": evaluate.evaluate, "readout": readout.readout,
    "train-align": train_align.train_align, "predict": predict.predict,
    "status": status.status, "help": help_command}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
app.add_typer(models.app, name="models")
app.add_typer(cluster.app, name="cluster")
use_plain_help(app)


def main() -> None:
    import os

    if "_STAINCTL_COMPLETE" in os.environ:
        # Shell completion is answered by typer's classes; load them only when asked.
        from typer.completion import completion_init

        completion_init()
    app(prog_name="stainctl")
