"""`stainctl status`: what is done, pending and failed, per slide. Reads only (the manifest is
opened read-only, so an archived workspace works); takes no lock."""

from __future__ import annotations

import sys
from typing import Any

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command


def status(workspace: opt.Workspace, json_out: opt.Json = False) -> None:
    """Show per slide: tiles total / on tissue / kept, the last step done, errors and
    warnings. Exit 1 when a slide of the workspace has an error (a script can test for
    failures), else 0; 2 when the workspace cannot be opened."""
    out = Output(json_out)

    def body() -> int:
        from stainctl.workspace import Workspace
        from stainctl.workspace.lock import holder

        ws = Workspace.open(workspace, readonly=True)
        # A step is running only while its run holds the lock; else it was interrupted.
        live = ws.manifest.live_run() if holder(ws.root / ".lock") else None
        summaries = ws.manifest.slide_summaries(live)
        slides = [s.as_dict() for s in summaries]
        # Counted as the run's summary counts them: a slide left out by design is not failed.
        left_out = sum(1 for s in summaries if s.left_out)
        failed = sum(1 for s in summaries if s.errors and not s.left_out)
        data = {"workspace": str(ws.root), "slides": slides, "failed": failed,
                "left_out": left_out}
        out.emit(data, lambda: _print(slides))
        return 1 if failed or left_out else 0

    run_command(out, body)


def _print(slides: list[dict[str, Any]]) -> None:
    if not slides:
        typer.echo("no slides yet: add some with `stainctl tile SLIDES -w WS`")
        return
    rows = []
    for s in slides:
        kept = s["tiles_kept"] if s["steps"].get("filter") == "done" else "-"
        pending = s["tiles_tissue"] - s["tiles_measured"]
        last = s["last_done"] or "-"
        for state in ("running", "interrupted"):  # interrupted: the same command resumes it
            steps = [k for k, v in s["steps"].items() if v == state]
            if steps:
                last += f" ({', '.join(steps)} {state})"
        errors = [f"{k}: {v}" for k, v in s["errors"].items()]
        warning = [f"warning: {s['warning']}"] if s["warning"] else []
        error = ("left out: " if s["left_out"] else "") + "; ".join(errors + warning)
        rows.append((s["slide"], str(s["tiles_total"]), str(s["tiles_tissue"]), str(kept),
                     str(pending) if s["steps"].get("filter") else "-", last, error))
    head = ("slide", "tiles", "tissue", "kept", "unfiltered", "last done", "error / warning")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for h in head:
            table.add_column(h, no_wrap=h == "slide", overflow="fold",
                             ratio=3 if h.startswith("error") else None)
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    else:
        typer.echo("\t".join(head))
        for r in rows:
            typer.echo("\t".join(r))
    for s in slides:  # the stain normalisation each slide was fitted with, one line per step
        for step, fit in s.get("stain_fits", {}).items():
            typer.echo(f"{s['slide']}: {step}: {fit_line(fit)}")


def fit_line(fit: dict[str, Any]) -> str:
    """A stain fit in a line: Macenko's H and E vectors and maximum concentrations, or
    Reinhard's Lab mean and spread, of the slide and of the target."""
    def part(p: dict[str, Any]) -> str:
        if "stain_matrix" in p:
            he = [[round(v, 3) for v in row] for row in p["stain_matrix"]]
            h = ",".join(str(row[0]) for row in he)
            e = ",".join(str(row[1]) for row in he)
            cmax = ",".join(str(round(v, 2)) for v in p.get("max_concentration", []))
            # A fit recorded before the plane was kept with it used torchstain's centred one.
            return f"H ({h}) E ({e}) max C ({cmax}) plane {p.get('plane', 'centred')}"
        if "lab_mean" in p:
            mean = ",".join(str(round(v, 1)) for v in p["lab_mean"])
            std = ",".join(str(round(v, 1)) for v in p.get("lab_std", []))
            return f"Lab mean ({mean}) spread ({std})"
        return ", ".join(f"{k} {v}" for k, v in p.items())
    return (f"{fit['method']} fitted: slide {part(fit.get('source', {}))}; "
            f"target {part(fit.get('target', {}))}")
