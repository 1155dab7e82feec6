"""Shell completion of option values: installed marker models, metric lists, devices.

Called by the shell on every Tab, so only light imports (model cards are TOML; no torch).
`--format` and the like complete from their choices without help from here.
"""

from __future__ import annotations

import typer

# As stainctl.evaluate.evaluator.METRICS (which imports numpy); a test keeps them equal.
METRICS = ("fid", "cropfid", "kid", "encoder", "stain", "paired", "seams", "colour", "mra")
DEVICES = ("auto", "cpu", "cuda")


def markers(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Installed marker models (weights present), named by what they make: `demo-ki67  ki67`."""
    from stainctl.models.lookup import is_installed
    from stainctl.models.registry import all_cards, models_dir

    try:
        directory = models_dir(ctx.params.get("models_dir"))
        cards = all_cards(directory)
    except Exception:  # a broken card must not break the shell's Tab
        return []
    return [(name, card.marker) for name, card in sorted(cards.items())
            if card.kind == "marker" and name.startswith(incomplete)
            and is_installed(card, directory)]


def metrics(incomplete: str) -> list[str]:
    """The metric names, after those already typed: `fid,crop<Tab>` -> `fid,cropfid`."""
    head, _, last = incomplete.rpartition(",")
    done = set(head.split(",")) if head else set()
    prefix = f"{head}," if head else ""
    return [prefix + m for m in METRICS if m.startswith(last) and m not in done]


def devices(incomplete: str) -> list[str]:
    return [d for d in DEVICES if d.startswith(incomplete)]


def commands(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """`stainctl help <Tab>`: the command names, or a group's commands after the group's."""
    cmd: object = ctx.find_root().command
    for word in ctx.params.get("command") or []:  # the words already typed
        cmd = getattr(cmd, "commands", {}).get(word)
        if cmd is None:
            return []
    return [(name, sub.get_short_help_str(limit=60))
            for name, sub in getattr(cmd, "commands", {}).items()
            if name.startswith(incomplete) and not sub.hidden]
