"""Human-readable summaries of step results."""

from __future__ import annotations

import sys
from typing import Any

import typer


def batch_summary(result: Any) -> None:
    """One line of totals, then one line per slide (a table on a terminal)."""
    slides = result.slides
    states = {k: sum(1 for s in slides if s.state == k) for k in ("done", "skipped", "failed")}
    left_out = sum(1 for s in slides if s.label == "left out")
    head = (f"{result.step}: {len(slides)} slide(s): {states['done']} done, "
            f"{states['skipped']} already done, {states['failed'] - left_out} failed"
            + (f", {left_out} left out" if left_out else ""))
    if slides and states["skipped"] == len(slides):
        head = (f"{result.step}: nothing to do, {len(slides)} slide(s) already done "
                "(--force redoes them)")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=head, title_justify="left")
        for col in ("slide", "state", "detail"):
            # A long path wraps onto the next line instead of ending in "…" in 80 columns.
            table.add_column(col, overflow="fold")
        style = {"failed": "bold red", "done": "green", "skipped": "dim", "left out": "yellow"}
        for s in slides:
            table.add_row(s.slide, f"[{style[s.label]}]{s.label}[/]", s.message)
        Console().print(table)
    else:
        typer.echo(head)
        for s in slides:
            typer.echo(f"  {s.label:<8} {s.slide}: {s.message}")
    if states["failed"]:
        _failure_hints(slides)


def _failure_hints(slides: list[Any]) -> None:
    """What to do next, per kind of failure (errors.HINTS: each kind has its own way out, and
    "run it again" alone would fail the same way), once per kind with its count."""
    from stainctl.errors import hint

    failed = [s for s in slides if s.state == "failed"]
    counts: dict[str | None, int] = {}
    for s in failed:  # in the order the slides failed
        counts[s.code] = counts.get(s.code, 0) + 1
    for code, n in counts.items():
        typer.echo(f"{n} slide(s) {hint(code)}", err=True)
    if len(failed) < len(slides):  # only then is there something saved to speak of
        typer.echo(f"The other {len(slides) - len(failed)} slide(s) are saved.", err=True)


def metrics_table(data: dict[str, Any]) -> None:
    """The ranked metrics of `evaluate`, then failures, caveats and the report's path."""
    from stainctl.evaluate.report import summary_table

    columns, rows = summary_table(data)
    real = data["real"]
    head = (f"real: {real['label']} ({real['images']} images); ranked by "
            f"{data['rank_by'] or 'nothing measured'}, best first")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=head, title_justify="left")
        for col in ("rank", "generated set", "images", *columns):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["rank"]), r["label"], str(r["images"]), *r["cells"])
        Console().print(table)
    else:
        typer.echo(head)
        for r in rows:
            cells = "; ".join(f"{c} {v}" for c, v in zip(columns, r["cells"], strict=True))
            typer.echo(f"  {r['rank']}. {r['label']} ({r['images']} images): {cells}")
    for f in data["fakes"]:
        if f.get("error"):
            typer.echo(f"failed: {f['label']}: {f['error']}", err=True)
    for c in data["caveats"]:
        typer.echo(f"caveat: {c}")
    for u in data.get("unavailable", []):
        typer.echo(f"not computed: {', '.join(u['metrics'])}: {u['reason']}")
    if data.get("report"):
        typer.echo(f"report: {data['report']}")
