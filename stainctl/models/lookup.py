"""From what a user types after `--marker` to one marker model's card.

`--marker` takes a marker model's name (`demo-ki67`) or a stain (`ki67`). For a stain, the rule is
the one a user can predict:
- the models that make it and whose weights are installed are the candidates; the user's own
  (in the models directory) come before the cards shipped with stainctl: a model trained for the
  site beats the shipped demonstration;
- one candidate (after that preference): it is used;
- several: nothing is picked; the message lists them and asks for a name;
- none installed: the one model that makes the stain is used, so that its missing weights give
  the message naming what to pull; if several make it, they are listed.
An unknown name gets the closest model names and stains ("did you mean pixcell-mist-her2?").
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

log = logging.getLogger(__name__)

MORE_MODELS = ("Train one (`stainctl train --marker ...`, installed at once), add one you have "
               "with `stainctl models add`, or pull a published one (`stainctl models list`)")


def is_shipped(card: ModelCard) -> bool:
    from stainctl.models.registry import SHIPPED

    return card.origin is not None and card.origin.parent == SHIPPED


def is_installed(card: ModelCard, directory: Path) -> bool:
    from stainctl.models.weights import locate

    return all(locate(card, w, directory).path is not None for w in card.weights)


def suggestions(query: str, names: list[str], n: int = 3) -> list[str]:
    """The names closest to `query`: those containing it (with `_` or spaces read as `-`),
    then difflib's closest."""
    q = query.lower().replace("_", "-").replace(" ", "-")
    containing = [name for name in names if q in name.lower()]
    close = difflib.get_close_matches(q, names, n=n, cutoff=0.7)  # not ck7 -> ki67
    return list(dict.fromkeys([*containing, *close]))[:n]


def marker_card(marker: str, directory: Path) -> ModelCard:
    """The card `--marker MARKER` means (see the module docstring), or a ModelError that says
    what to type instead."""
    from stainctl.models.registry import all_cards

    cards = all_cards(directory)
    markers = {name: c for name, c in cards.items() if c.kind == "marker"}
    if marker in markers:
        return markers[marker]
    if marker in cards:
        raise ModelError(f"{marker} is {'an' if cards[marker].kind == 'encoder' else 'a'} "
                         f"{cards[marker].kind} model, not a marker model; marker models: "
                         f"{', '.join(sorted(markers))}")
    makers = sorted((c for c in markers.values() if c.marker == marker.lower()),
                    key=lambda c: (is_shipped(c), c.name))
    installed = [c for c in makers if is_installed(c, directory)]
    own = [c for c in installed if not is_shipped(c)]
    candidates = own or installed
    if len(candidates) == 1:
        others = [c for c in makers if c is not candidates[0]]
        ready = [c.name for c in others if c in installed]
        missing = [c.name for c in others if c not in installed]
        also = ([f"{', '.join(ready)} (installed)"] if ready else []) + (
            [f"{', '.join(missing)} once pulled with `stainctl models pull NAME`"] if missing
            else [])
        if also:
            log.info("--marker %s: using %s (also made by %s)", marker, candidates[0].name,
                     "; ".join(also))
        return candidates[0]
    if len(candidates) > 1:
        raise ModelError(
            f"several installed models make {marker!r}: "
            f"{', '.join(_label(c) for c in candidates)}; choose one with --marker NAME")
    if len(makers) == 1:
        return makers[0]  # its missing weights give the message naming what to pull
    if makers:
        raise ModelError(
            f"several models make {marker!r}, none installed yet: "
            f"{', '.join(c.name for c in makers)}; get one (`stainctl models pull NAME`) and "
            "choose it with --marker NAME")
    have = sorted(_label(c) for c in markers.values() if is_installed(c, directory))
    stains = sorted({c.marker for c in markers.values() if c.marker})
    near = suggestions(marker, sorted(markers) + stains)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ModelError(
        f"no model makes {marker!r}; {hint}installed marker models: {', '.join(have) or 'none'}. "
        f"{MORE_MODELS}")


def _label(card: ModelCard) -> str:
    return f"{card.name} ({card.marker})"
