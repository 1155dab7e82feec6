"""Generate man/stainctl.1 and completions/stainctl.{bash,zsh,fish} from the CLI itself.

Run `python -m stainctl.cli.docs` after changing the CLI; a test fails while they are stale.
The output has no date in it, so regenerating an unchanged CLI changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SHELLS = ("bash", "zsh", "fish")
PROG = "stainctl"
COMPLETE_VAR = "_STAINCTL_COMPLETE"


def command_tree() -> Any:
    """The Click command group behind the Typer app (typer vendors its own click)."""
    import typer

    from stainctl.cli.app import app

    return typer.main.get_command(app)


def _context(cmd: Any, name: str, parent: Any = None) -> Any:
    from typer._click import Context

    return Context(cmd, info_name=name, parent=parent)


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _option_lines(cmd: Any, ctx: Any) -> list[str]:
    """One `.TP` entry per option, from the same help record that `--help` prints."""
    from stainctl.cli.help import term

    lines = []
    for p in cmd.params:
        record = p.get_help_record(ctx) if p.param_type_name == "option" else None
        if record:
            decl, help_text = record
            lines += [".TP", f"\\fB{_roff(term(decl))}\\fR", _roff(help_text)]
    return lines


def man_page() -> str:
    from stainctl import __version__

    root = command_tree()
    ctx = _context(root, PROG)
    out = [
        f'.TH STAINCTL 1 "" "stainctl {__version__}" "User Commands"',
        ".SH NAME",
        "stainctl \\- turn H&E whole\\-slide images into virtual IHC slides, in batches",
        ".SH SYNOPSIS",
        "\\fBstainctl\\fR [\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _roff(root.help or ""),
        ".SH COMMANDS",
    ]
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        assert cmd is not None
        sub = _context(cmd, name, ctx)
        usage = " ".join(cmd.collect_usage_pieces(sub))
        out += [f".SS {PROG} {name}", f"\\fB{PROG} {name}\\fR {_roff(usage)}", ".PP",
                _roff(cmd.help or ""), *_option_lines(cmd, sub)]
    out += [
        ".SH EXIT STATUS",
        ".TP", "0", "Everything asked for is done.",
        ".TP", "1", "Some slides failed; the others finished and are saved.",
        ".TP", "2", "Usage error: bad arguments, no workspace, the workspace is locked, "
        "read-only or damaged, or a folder cannot be written.",
        ".TP", "130, 143", "Stopped by Ctrl-C (SIGINT) or SIGTERM at a safe point: what "
        "finished is saved, the run is recorded as interrupted; the same command resumes it.",
        ".SH ENVIRONMENT",
        ".TP", "\\fBSTAINCTL_WORKSPACE\\fR", "Default for \\fB\\-w/\\-\\-workspace\\fR.",
        ".SH FILES",
        ".TP", "\\fIWORKSPACE\\fR/manifest.sqlite",
        "The manifest: slides, tiles, filter metrics, steps, runs and artifacts (SQLite, WAL).",
        ".TP", "\\fIWORKSPACE\\fR/slides/\\fISLIDE\\fR/",
        "Per-slide thumbnail.png and tissue_mask.png.",
    ]
    return "\n".join(out) + "\n"


def completion(shell: str) -> str:
    from typer.completion import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell) + "\n"


def expected_files() -> dict[str, str]:
    files = {"man/stainctl.1": man_page()}
    for shell in SHELLS:
        files[f"completions/stainctl.{shell}"] = completion(shell)
    return files


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0] if argv else ".")
    for rel, text in expected_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
