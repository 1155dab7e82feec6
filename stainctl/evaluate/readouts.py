"""`stainctl evaluate --readout A.csv --readout B.csv`: agreement of two per-slide readouts.

Each CSV has a row per slide (`readout.csv`, `predict.csv`, or a lab's own table) and a `slide`
column naming it. Rows are matched on `slide`; every other column the two files share is
compared: numeric columns as values (Pearson/Spearman r, Bland-Altman bias and limits of B
against A), text columns (a class such as Ki67 low/high) as classes (weighted F1 of B with A as
the reference, its bootstrap 95 % interval, per-class recall).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from stainctl.errors import UsageError
from stainctl.evaluate.agreement import class_agreement, value_agreement

KEY = "slide"
SKIP = {"path", "model", "marker"}  # what says where a row came from, not what it measured


def read_readout(path: Path) -> dict[str, dict[str, str]]:
    """slide -> {column: text} of one readout CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise UsageError(f"--readout {path}: cannot be read ({err.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise UsageError(f"--readout {path}: not a CSV file ({err})") from None
    if not rows or KEY not in rows[0]:
        raise UsageError(f"--readout {path}: needs a header with a '{KEY}' column and a row per "
                         "slide (as `stainctl readout` and `predict` write)")
    return {r[KEY]: r for r in rows}


def _number(text: str) -> float | None:
    try:
        return float(text) if text.strip() else math.nan
    except ValueError:
        return None


def compare_readouts(a_path: Path, b_path: Path, seed: int = 0) -> dict[str, Any]:
    a, b = read_readout(a_path), read_readout(b_path)
    slides = sorted(set(a) & set(b))
    if not slides:
        raise UsageError(f"--readout {a_path} and {b_path} share no slide (rows are matched on "
                         f"their '{KEY}' column)")
    first_a, first_b = next(iter(a.values())), next(iter(b.values()))
    columns = [c for c in first_a if c in first_b and c != KEY and c not in SKIP]
    values: dict[str, Any] = {}
    classes: dict[str, Any] = {}
    for col in columns:
        if not any(a[s][col].strip() or b[s][col].strip() for s in slides):
            continue  # empty on both sides (readout's `warning` when nothing was warned)
        xs = [_number(a[s][col]) for s in slides]
        ys = [_number(b[s][col]) for s in slides]
        if all(v is not None for v in xs + ys):
            values[col] = value_agreement(xs, ys).as_dict()  # type: ignore[arg-type]
        else:
            classes[col] = class_agreement([a[s][col] for s in slides],
                                           [b[s][col] for s in slides], seed=seed).as_dict()
    return {"a": str(a_path), "b": str(b_path), "slides": len(slides),
            "only_in_a": sorted(set(a) - set(b)), "only_in_b": sorted(set(b) - set(a)),
            "values": values, "classes": classes}
