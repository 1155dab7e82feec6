"""What `readout` writes: OUT/readout.csv (a row per slide), a heat-map PNG and a GeoJSON per slide.

The CSV's columns are fixed (`COLUMNS`) and carry their units in their names. The GeoJSON is a
FeatureCollection of one square Polygon per tile in level-0 pixel coordinates (x right, y down, as
QuPath uses them), each with the tile's measurements as properties; QuPath imports it as-is
(File > Import objects) as tiles over the slide. The heat map shows per tile the index (nuclear
markers) or the DAB-positive area fraction, 0 to 100 %, one pixel per tile scaled up; glass and
unread tiles are white. Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stainctl.readout.measure import TileReadout
    from stainctl.readout.records import SlideReadout

COLUMNS = ("slide", "path", "marker", "mpp_um", "tiles", "tissue_mm2", "dab_positive_area_pct",
           "h_score", "weak_area_pct", "moderate_area_pct", "strong_area_pct", "nuclei",
           "positive_nuclei", "index_pct", "nuclei_per_mm2", "warning")
HEATMAP_TILE_PX = 8  # each tile is drawn as a square this many pixels wide


def write_outputs(slides: list[SlideReadout], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(slides, out / "readout.csv")
    for s in slides:
        _atomic_bytes(out / f"{s.name}.heatmap.png", heatmap_png(s))
        _atomic_bytes(out / f"{s.name}.geojson",
                      json.dumps(geojson(s), indent=1).encode())


def _write_csv(slides: list[SlideReadout], path: Path) -> None:
    """One row per slide of this run; rows of other slides already in the file are kept (a
    run over part of a batch does not drop the rest)."""
    from stainctl.readout.records import slide_row

    rows: dict[str, dict[str, object]] = {}
    if path.exists():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("slide"):
                    rows[row["slide"]] = dict(row)
    for s in slides:
        rows[s.name] = slide_row(s)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows.values():
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    _atomic_bytes(path, buf.getvalue().encode())


def tile_properties(r: TileReadout) -> dict[str, object]:
    index = r.index
    return {
        "tissue_um2": round(r.tissue_um2, 3),
        "dab_positive_area_pct": round(100 * r.positive_fraction, 3),
        "h_score": round(r.h_score, 2),
        "nuclei": r.nuclei, "positive_nuclei": r.positive_nuclei,
        "index_pct": None if index is None else round(100 * index, 3),
    }


def geojson(slide: SlideReadout) -> dict[str, object]:
    features = []
    for t in slide.tiles:
        # The part of the tile inside the slide: the measurements cover only that.
        x1 = min(t.x0 + t.extent0, slide.width0)
        y1 = min(t.y0 + t.extent0, slide.height0)
        ring = [[t.x0, t.y0], [x1, t.y0], [x1, y1], [t.x0, y1], [t.x0, t.y0]]
        # QuPath takes numbers only as measurements: a count not made is left out, not null.
        measurements = {k: v for k, v in tile_properties(t.readout).items() if v is not None}
        props: dict[str, object] = {"objectType": "tile", "name": f"{t.x0},{t.y0}",
                                    "measurements": measurements}
        features.append({"type": "Feature", "geometry": {"type": "Polygon",
                                                         "coordinates": [ring]},
                         "properties": props})
    return {"type": "FeatureCollection", "features": features,
            "properties": {"slide": slide.name, "marker": slide.marker,
                           "coordinates": "level-0 pixels"}}


def heatmap_values(slide: SlideReadout) -> np.ndarray:
    """(rows, cols) per-tile value 0-1 (index, else DAB-positive fraction); NaN where no tile."""
    if not slide.tiles:
        return np.full((1, 1), np.nan)
    extent = slide.tiles[0].extent0
    cols = max(1, int(np.ceil(slide.width0 / extent)))
    rows = max(1, int(np.ceil(slide.height0 / extent)))
    grid = np.full((rows, cols), np.nan)
    for t in slide.tiles:
        r = t.readout
        value = r.index if r.index is not None else r.positive_fraction
        if r.nuclei is not None and r.index is None:
            value = 0.0  # tissue without nuclei found: nothing positive
        grid[min(rows - 1, round(t.y0 / extent)), min(cols - 1, round(t.x0 / extent))] = value
    return grid


def heatmap_png(slide: SlideReadout) -> bytes:
    import cv2

    values = heatmap_values(slide)
    scaled = np.nan_to_num(values, nan=0.0)
    grey = np.clip(scaled * 255, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    rgb[np.isnan(values)] = 255
    rgb = np.repeat(np.repeat(rgb, HEATMAP_TILE_PX, axis=0), HEATMAP_TILE_PX, axis=1)
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - PNG encoding of a uint8 image does not fail
        raise OSError("could not encode the heat map")
    return bytes(data.tobytes())


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
