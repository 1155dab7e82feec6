"""`stainctl models list|show|pull|add`: the model cards, and whether their weights are here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stainctl.cli import options as opt
from stainctl.cli.output import Output, run_command

app = typer.Typer(name="models", no_args_is_help=True,
                  help="Model cards and their weights: list, show, pull, add.")

Name = Annotated[str, typer.Argument(help="Model name (see `stainctl models list`).")]


def _status(card: Any, directory: Path) -> list[dict[str, Any]]:
    from stainctl.models.weights import locate

    out = []
    for w in card.weights:
        found = locate(card, w, directory)
        out.append({"role": w.role, "source": w.source, "gated": w.gated,
                    "path": str(found.path) if found.path else None, "where": found.where})
    return out


@app.command("list")
def list_models(models_dir: opt.ModelsDir = None, json_out: opt.Json = False) -> None:
    """Every known model, whether all its weights are installed, and which models it runs with
    (base, flow, encoder) are not."""
    out = Output(json_out)

    def body() -> int:
        from stainctl.errors import ModelError
        from stainctl.models.registry import all_cards, required_cards
        from stainctl.models.registry import models_dir as resolve_dir

        directory = resolve_dir(models_dir)
        cards = all_cards(directory)
        missing = {name: [str(f["role"]) for f in _status(card, directory) if f["path"] is None]
                   for name, card in cards.items()}
        rows: list[dict[str, Any]] = []
        for card in cards.values():
            try:  # the models it runs with (base, flow, encoder) that are not installed
                needs = [c.name for c in required_cards(card, directory)[1:] if missing[c.name]]
            except ModelError as err:  # a card naming an unknown model
                needs = [str(err).split(";")[0]]
            rows.append({"name": card.name, "kind": card.kind, "engine": card.engine,
                         "marker": card.marker, "installed": not missing[card.name],
                         "missing": missing[card.name], "needs": needs,
                         "licence": card.licence, "card": str(card.origin)})
        def human() -> None:
            typer.echo(f"models directory: {directory}")
            table = [("name", "makes", "engine", "weights")]
            for r in rows:
                state = ("installed" if r["installed"]
                         else "missing " + ", ".join(r["missing"]))
                if r["needs"]:
                    state += "; needs " + ", ".join(r["needs"])
                table.append((r["name"], r["marker"] or r["kind"], r["engine"], state))
            # Columns as wide as their longest cell: fixed widths let 'histdist' and
            # 'normaliser' push the rest of their rows out of line.
            widths = [max(len(row[i]) for row in table) for i in range(3)]
            for row in table:
                typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                           + "  " + row[3])

        out.emit({"models_dir": str(directory), "models": rows}, human)
        return 0

    run_command(out, body)


@app.command("show")
def show(name: Name, models_dir: opt.ModelsDir = None, json_out: opt.Json = False) -> None:
    """The card of a model and where each of its weight files is (or how to get it)."""
    out = Output(json_out)

    def body() -> int:
        from stainctl.models.registry import get_card
        from stainctl.models.registry import models_dir as resolve_dir
        from stainctl.models.weights import locate, missing_message

        directory = resolve_dir(models_dir)
        card = get_card(name, directory)
        files = _status(card, directory)
        data = {**card.as_dict(), "files": files}

        def human() -> None:
            for key in ("name", "kind", "engine", "marker", "encoder", "input_mpp", "tile_size",
                        "licence", "intended_use", "training_data", "description"):
                if data.get(key):
                    typer.echo(f"{key}: {data[key]}")
            for key, value in card.metrics.items():  # what training measured (train-align)
                typer.echo(f"metrics.{key}: {value}")
            typer.echo(f"card: {card.origin}")
            for w in card.weights:
                found = locate(card, w, directory)
                where = (f"{found.path} ({found.where})" if found.path
                         else "MISSING: " + missing_message(card, found, directory))
                typer.echo(f"  {w.role}: {w.source}\n    {where}")

        out.emit(data, human)
        return 0

    run_command(out, body)


@app.command("pull")
def pull(name: Name, models_dir: opt.ModelsDir = None, json_out: opt.Json = False) -> None:
    """Download a model's missing weights into the Hugging Face cache (uses HF_TOKEN)."""
    out = Output(json_out)

    def body() -> int:
        from stainctl.models.registry import get_card
        from stainctl.models.registry import models_dir as resolve_dir
        from stainctl.models.weights import pull as pull_weights

        directory = resolve_dir(models_dir)
        card = get_card(name, directory)
        found = pull_weights(card, directory)
        files = [{"role": f.weight.role, "path": str(f.path), "where": f.where} for f in found]
        def human() -> None:
            for f in files:
                typer.echo(f"{f['role']}: {f['path']}")

        out.emit({"model": card.name, "files": files}, human)
        return 0

    run_command(out, body)


@app.command("add")
def add(
    source: Annotated[Path, typer.Argument(
        help="A model card (.toml or .json), or a model folder (a HistDiST pipeline folder, "
             "with --for, or any folder holding its card.toml).", exists=True)],
    weights: Annotated[list[Path] | None, typer.Option(
        "--weights", help="A weight file to copy beside the card (repeatable).",
        exists=True, dir_okay=False)] = None,
    for_model: Annotated[str | None, typer.Option(
        "--for", help="The model a folder is (e.g. histdist-er), when it holds no card.")]
    = None,
    models_dir: opt.ModelsDir = None,
    json_out: opt.Json = False,
) -> None:
    """Register your own model: the card (and weights), or a model folder, are copied into the
    models directory."""
    out = Output(json_out)

    def body() -> int:
        from stainctl.errors import UsageError
        from stainctl.models.registry import install, install_folder
        from stainctl.models.registry import models_dir as resolve_dir

        directory = resolve_dir(models_dir)
        if source.is_dir():
            if weights:
                raise UsageError("--weights goes with a card file; a folder is copied whole")
            target = install_folder(source, for_model, directory)
            card = target.name
        else:
            if for_model:
                raise UsageError("--for goes with a model folder, not a card file")
            installed = install(source, list(weights or []), directory)
            card, target = installed.parent.name, installed.parent
        out.emit({"model": card, "directory": str(target)},
                 lambda: typer.echo(f"added {card} in {target}"))
        return 0

    run_command(out, body)
