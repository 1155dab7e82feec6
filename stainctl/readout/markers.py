"""Which IHC markers `readout` knows, and which of them stain nuclei.

A nuclear marker (its antigen sits in the nucleus) is read out as an index: positive nuclei over
all nuclei, as pathologists report Ki67, ER, PR and P53. Membrane and cytoplasmic markers are read
as DAB area and H-score only. `--marker` takes a stain below or a marker model's name (its card's
`marker`), so `readout -w WS --marker demo-ki67` reads the virtual Ki67 of the main job.
"""

from __future__ import annotations

from stainctl.errors import UsageError

NUCLEAR = frozenset({"ki67", "er", "pr", "p53"})
OTHER = frozenset({"her2", "ck7", "ck20", "pdl1", "cd3", "cd8", "cd20", "pancytokeratin",
                   "prospc", "fhl2"})
ALIASES = {"pd-l1": "pdl1", "ki-67": "ki67", "tp53": "p53", "panck": "pancytokeratin",
           "ck": "pancytokeratin", "pgr": "pr", "esr1": "er", "erbb2": "her2"}


def known_markers() -> list[str]:
    return sorted(NUCLEAR | OTHER)


def resolve_marker(name: str, models_dir: object = None) -> str:
    """The stain `name` means: a known stain, an alias of one, or a marker model's card's
    stain. Anything else is a usage error listing the known markers."""
    q = name.strip().lower()
    q = ALIASES.get(q, q)
    if q in NUCLEAR or q in OTHER:
        return q
    stain = _card_marker(name, models_dir)
    if stain is not None:
        return ALIASES.get(stain, stain)
    raise UsageError(f"unknown marker {name!r}: readout knows {', '.join(known_markers())} "
                     "(nuclear: " + ", ".join(sorted(NUCLEAR)) + "), or a marker model's name; "
                     "for another nuclear marker pass a known one's name with --nuclear")


def is_nuclear(marker: str) -> bool:
    return marker in NUCLEAR


def _card_marker(name: str, models_dir: object) -> str | None:
    from pathlib import Path

    from stainctl.models.registry import all_cards

    directory = Path(str(models_dir)) if models_dir is not None else None
    try:
        card = all_cards(directory).get(name)
    except Exception:  # an unreadable models folder: then it is not a model name
        return None
    if card is None:
        return None
    marker = getattr(card, "marker", None)
    return str(marker).lower() if marker else None
