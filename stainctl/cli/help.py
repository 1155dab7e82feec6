"""Plain `--help` that reads well in an 80-column terminal.

Typer's Rich panels print boolean flags as `--force <bool>`, spend a third of the width on type
and box columns, and cut words that do not fit their column with "…" (defaults such as
`~/.local/share/stainctl/models` lost their end). Click's plain layout shows flags bare and
wraps at spaces; two things are added here: a `[default: ...]`/`[env var: ...]` note is never
split across lines, and a group lists each command's whole first sentence instead of cutting
it at 45 characters with "...". The man page is built from the same help records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated

import typer
from typer._click import Context, HelpFormatter
from typer.core import TyperCommand, TyperGroup

from stainctl.cli import complete

NBSP = "\u00a0"  # textwrap breaks at neither of these; written back as a space and "-"
NBHYPHEN = "\u2011"
_LIST_TYPE = re.compile(r"<list\[(\w+)\]>")  # typer's label of a repeatable option
_NOTE = re.compile(r"\[[^\[\]]*\]$")  # the trailing [env var: ...; default: ...; required]


def _keep_together(text: str) -> str:
    """No line break inside a hyphenated word (`--paired-ihc`, a file name), and the trailing
    note wraps as a unit (it may still break after a ';' when wider than the column)."""
    text = text.replace("-", NBHYPHEN)
    note = _NOTE.search(text)
    if not note:
        return text
    return text[:note.start()] + note.group().replace(" ", NBSP).replace(";" + NBSP, "; ")


def term(decl: str) -> str:
    """An option's left column: `--he <path>`, not typer's `--he <list[Path]>` (the help says
    when an option repeats)."""
    return _LIST_TYPE.sub(lambda m: f"<{m.group(1).lower()}>", decl)


class PlainFormatter(HelpFormatter):
    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30,
                 col_spacing: int = 2) -> None:
        super().write_dl([(term(decl), _keep_together(text)) for decl, text in rows],
                         col_max, col_spacing)

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", NBHYPHEN))

    def write(self, string: str) -> None:
        super().write(string.replace(NBSP, " ").replace(NBHYPHEN, "-"))


class PlainContext(Context):
    formatter_class = PlainFormatter


class PlainCommand(TyperCommand):
    context_class = PlainContext


class PlainGroup(TyperGroup):
    context_class = PlainContext

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                # The whole first sentence (or paragraph), wrapped, never cut with "...".
                rows.append((name, cmd.get_short_help_str(limit=1_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def use_plain_help(app: typer.Typer) -> None:
    """Give every command and group of `app` (sub-apps included) the plain help classes; call
    it once after the commands are registered, so a new subcommand gets them too. A command
    registered with a class of its own keeps it."""
    if not isinstance(app.info.cls, type) or app.info.cls is TyperGroup:
        app.info.cls = PlainGroup
    for command in app.registered_commands:
        if not isinstance(command.cls, type) or command.cls is TyperCommand:
            command.cls = PlainCommand
    for group in app.registered_groups:
        if not isinstance(group.cls, type) or group.cls is TyperGroup:
            group.cls = PlainGroup
        if group.typer_instance is not None:
            use_plain_help(group.typer_instance)


def help_command(command: Annotated[list[str] | None, typer.Argument(
        help="A command, or a group and its command (`models list`).", show_default=False,
        autocompletion=complete.commands)]
        = None) -> None:
    """Show the help of stainctl, or of a command (`stainctl help translate`)."""
    from stainctl.cli.app import app  # this module is imported by app.py

    # The app itself answers, so an unknown name gets click's usage error and exit status 2.
    app(args=[*(command or []), "--help"], prog_name="stainctl")
