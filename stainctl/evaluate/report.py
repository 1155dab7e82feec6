"""The QC report folder: metrics.json, index.html and the PNG figures it shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.evaluate.evaluator import Evaluation, SetResult
from stainctl.evaluate.sources import Item

SAMPLES = 8  # tiles per set in the random sample grid
NONE = "n/a"  # a metric that was not measured, or is undefined

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>stainctl evaluate: {{ real.label }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
.caveat { color: #8a4b00; } .error { color: #b00020; }
</style></head><body>
<h1>Virtual stain evaluation</h1>
<p>Real set: <b>{{ real.label }}</b> ({{ real.kind }}, {{ real.images }} images), {{ path(real) }}.
Generated sets are ranked by <b>{{ rank_by or "nothing measured" }}</b>, best first. Lower is better
for FID, CropFID, KID, Fréchet distances, Wasserstein distances and divergences.</p>
<table>
<tr><th>rank</th><th>generated set</th><th>images</th>
{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td class="n">{{ row.rank }}</td><td>{{ row.label }}</td>
<td class="n">{{ row.images }}</td>
{% for v in row.cells %}<td class="n">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for f in failed %}<p class="error">{{ f.label }}: {{ f.error }}</p>{% endfor %}
{% for c in caveats %}<p class="caveat">Caveat: {{ c }}</p>{% endfor %}
{% for u in unavailable %}<p class="caveat">Not computed: {{ u.metrics|join(", ") }}:
{{ u.reason }}</p>{% endfor %}
{% for fig in figures %}<h2>{{ fig.title }}</h2>
<p>{{ fig.caption }}</p>{% if fig.file %}<img src="{{ fig.file }}" alt="{{ fig.title }}">{% endif %}
{% endfor %}
<p>Settings: <code>{{ settings }}</code>. All numbers: <a href="metrics.json">metrics.json</a>.</p>
</body></html>
"""


def write_report(evaluation: Evaluation, folder: Path, seed: int = 0) -> Path:
    """Write the report; returns the HTML page's path."""
    from jinja2 import Environment

    from stainctl.workspace.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    figures = _figures(evaluation, folder, seed)
    with atomic_path(folder / "metrics.json") as tmp:
        tmp.write_text(json.dumps(evaluation.to_json(), indent=2) + "\n")
    columns, rows = summary_table(evaluation.to_json())
    page = Environment(autoescape=True).from_string(PAGE).render(
        real=evaluation.real, rank_by=evaluation.rank_by, columns=columns, rows=rows,
        failed=[f for f in evaluation.fakes if f.error], caveats=evaluation.caveats,
        unavailable=evaluation.unavailable,
        figures=figures, settings=json.dumps(evaluation.settings), path=lambda r: r.path)
    html = folder / "index.html"
    with atomic_path(html) as tmp:
        tmp.write_text(page)
    return html


def _fmt(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, dict):
        if "mean" in value:
            return f"{_fmt(value['mean'])} ± {_fmt(value['std'])}"
        return NONE
    v = float(value)
    if not np.isfinite(v):
        return NONE
    return f"{v:.4g}"


COLUMNS = (
    ("FID", lambda m: m.get("fid")),
    ("CropFID", lambda m: m.get("cropfid")),
    ("KID", lambda m: m.get("kid")),
    ("encoder FD", lambda m: m.get("encoder", {}).get("frechet")),
    ("encoder cos", lambda m: m.get("encoder", {}).get("cosine_of_means")),
    ("DAB p90 real/fake", lambda m: None if "stain" not in m else
     f"{m['stain']['p90_real']:.3f} / {m['stain']['p90_fake']:.3f}"),
    ("DAB+ area W1", lambda m: m.get("stain", {}).get("positive_fraction_wasserstein")),
    ("DAB hist JSD", lambda m: m.get("stain", {}).get("pooled_hist_jsd")),
    ("paired SSIM (1/4)", lambda m: m.get("paired", {}).get("ssim_reduced")),
    ("paired p90 r", lambda m: m.get("paired", {}).get("stain", {}).get("p90_pearson_r")),
    ("seam ratio", lambda m: m.get("seams", {}).get("ratio")),
    ("Lab distance", lambda m: m.get("colour", {}).get("distance", {}).get("lab_distance")),
    ("H angle °", lambda m: m.get("colour", {}).get("distance", {}).get("haematoxylin_angle")),
    ("MRA top-1/top-3 (chance)", lambda m: None if "mra" not in m else
     f"{m['mra']['top1']:.3f} / {m['mra']['top3']:.3f} "
     f"({m['mra']['chance_top1']:.3f} / {m['mra']['chance_top3']:.3f})"),
)


def summary_table(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and ranked rows of the measured metrics, from `Evaluation.to_json()`."""
    ok = [f for f in data["fakes"] if not f.get("error")]
    used = [(name, get) for name, get in COLUMNS if any(get(f) is not None for f in ok)]
    order = {label: i for i, label in enumerate(data["ranking"])}
    rows = []
    for f in sorted(ok, key=lambda f: order.get(f["label"], len(order))):
        values = [v if isinstance(v := get(f), str) else _fmt(v) for _, get in used]
        rows.append({"rank": order.get(f["label"], 0) + 1, "label": f["label"],
                     "images": f["images"], "cells": values})
    return [name for name, _ in used], rows


def _figures(evaluation: Evaluation, folder: Path, seed: int) -> list[dict[str, str]]:
    from stainctl.evaluate.figures import dab_histograms, slide_panel, tile_grid

    real = evaluation.real
    fakes = [f for f in evaluation.fakes if f.error is None and f.measures is not None]
    out: list[dict[str, str]] = []
    keys, titles = _sample_keys(real, fakes, seed)
    first = {it.key: i for i, it in enumerate(fakes[0].items)} if fakes else {}
    positions = [k if isinstance(k, int) else first.get(k, 0) for k in keys]
    rows = [(r.label, _items_at(r, keys, positions)) for r in (real, *fakes)]
    out.append({"title": "Random sample", "file": tile_grid(rows, folder / "samples.png",
                                                             titles).name,
                "caption": "The same tiles (same key, else the same position in each set's "
                           "selection) across the sets, chosen at random."})
    for i, f in enumerate(fakes):
        best, worst = f.metrics.get("best", []), f.metrics.get("worst", [])
        if not best:
            continue
        by_key = {it.key: it for it in f.items}
        name = f"best_worst_{i + 1}.png"
        tile_grid([("best", [by_key.get(k) for k in best]),
                   ("worst", [by_key.get(k) for k in worst])], folder / name)
        out.append({"title": f"Best and worst tiles: {f.label}", "file": name,
                    "caption": "By a proxy badness score: low saturation spread, repetition "
                               "(shifted autocorrelation) and extreme Laplacian variance."})
    pooled = [(r.label, np.sum([d.hist for d in r.measures.dab], axis=0))
              for r in (real, *fakes) if r.measures is not None and r.measures.dab]
    if len(pooled) == 1 + len(fakes):
        dab_histograms(pooled[0], pooled[1:], folder / "dab_histograms.png")
        out.append({"title": "DAB histograms", "file": "dab_histograms.png",
                    "caption": "Pooled DAB optical density of all evaluated tiles, by colour "
                               "deconvolution with the standard H-DAB vectors."})
    n = 0
    for f in fakes:
        previews = f.image_set.previews if f.image_set is not None else []
        for p in previews:
            n += 1
            name = f"slide_{n}.png"
            try:
                slide_panel(p, folder / name)
            except Exception as err:  # a thumbnail must not sink the report
                out.append({"title": f"Slide {p.key} ({f.label})", "file": "",
                            "caption": f"thumbnail failed: {err}"})
                continue
            out.append({"title": f"Slide {p.key} ({f.label})", "file": name,
                        "caption": "H&E | virtual IHC | DAB heat-map (inferno: dark = none)."})
    return out


def _sample_keys(real: SetResult, fakes: list[SetResult],
                 seed: int) -> tuple[list[str | int], list[str]]:
    """Keys shared by all generated sets (else positions), SAMPLES of them at random."""
    measured = [f.measures.keys for f in fakes if f.measures is not None]
    common = sorted(set.intersection(*(set(k) for k in measured))) if measured else []
    rng = np.random.default_rng(seed)
    if common:
        pick = sorted(rng.choice(len(common), size=min(SAMPLES, len(common)), replace=False))
        keys: list[str | int] = [common[i] for i in pick]
        return keys, [str(k) for k in keys]
    n = min(len(real.items), *(len(f.items) for f in fakes)) if fakes else len(real.items)
    pick = sorted(rng.choice(n, size=min(SAMPLES, n), replace=False)) if n else []
    return [int(i) for i in pick], [f"#{int(i)}" for i in pick]


def _items_at(result: SetResult, keys: list[str | int],
              positions: list[int]) -> list[Item | None]:
    """The item with each key, else the one at the same position of the set's selection."""
    by_key = {it.key: it for it in result.items}
    out: list[Item | None] = []
    for k, pos in zip(keys, positions, strict=True):
        found = by_key.get(k) if isinstance(k, str) else None
        out.append(found or (result.items[pos] if pos < len(result.items) else None))
    return out
