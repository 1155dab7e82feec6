"""Human-readable summaries of step results."""

from __future__ import annotations

import sys
from typing import Any

import typer


def batch_summary(result: Any) -> None:
    """One line of totals, then one line per slide (a table on a terminal)."""
    slides = result.slides
    states = {k: sum(1 for s in slides if s.state == k) for k in ("done", "skipped", "failed")}
    head = (f"{result.step}: {len(slides)} slide(s): {states['done']} done, "
            f"{states['skipped']} already done, {states['failed']} failed")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=head, title_justify="left")
        for col in ("slide", "state", "detail"):
            table.add_column(col)
        style = {"failed": "bold red", "done": "green", "skipped": "dim"}
        for s in slides:
            table.add_row(s.slide, f"[{style[s.state]}]{s.state}[/]", s.message)
        Console().print(table)
    else:
        typer.echo(head)
        for s in slides:
            typer.echo(f"  {s.state:<8} {s.slide}: {s.message}")
    if states["failed"]:
        typer.echo(f"{states['failed']} slide(s) failed; the others are saved. Fix the cause "
                   "shown above and run the same command again: finished work is skipped.",
                   err=True)
