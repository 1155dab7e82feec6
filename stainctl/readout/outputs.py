"""What `readout` writes: OUT/readout.csv (a row per slide), a heat-map PNG and a GeoJSON per slide.

The CSV's columns are fixed (`COLUMNS`) and carry their units in their names. The GeoJSON is a
FeatureCollection of one square Polygon per tile in level-0 pixel coordinates (x right, y down, as
QuPath uses them), each with the tile's measurements as properties; QuPath imports it as-is
(File > Import objects) as tiles over the slide. The heat map shows per tile the index (nuclear
markers) or the DAB-positive area fraction, 0 to 100 %, one pixel per tile scaled up; glass and
unread tiles are white. Files are written under a temporary name and renamed into place.
`predict` writes its CSV, tiles and heat-map with the same functions (`write_table`,
`tile_feature`, `grid_png`), so its files sit beside readout's in the same form.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stainctl.workspace.atomic import atomic_bytes

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
        atomic_bytes(out / f"{s.name}.heatmap.png", heatmap_png(s))
        write_geojson(out / f"{s.name}.geojson", s)


def write_geojson(path: Path, slide: SlideReadout) -> None:
    """The slide's tiles as a GeoJSON FeatureCollection (`geojson(slide)`, streamed)."""
    write_feature_collection(path, _features(slide), _collection_properties(slide))


def write_feature_collection(path: Path, features: Iterable[Mapping[str, object]],
                             properties: Mapping[str, object]) -> None:
    """A GeoJSON FeatureCollection written a feature per line as it is made (readout, predict):
    neither the whole document nor its text is held (they grew with the slide: +5-7 MB of peak
    memory at 841 tiles), and each feature is encoded by json's C encoder (an indented document
    goes through its pure-Python one)."""
    from stainctl.workspace.atomic import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        sep = "\n"
        for feature in features:
            f.write(sep)
            f.write(json.dumps(feature))
            sep = ",\n"
        f.write("\n], \"properties\": ")
        f.write(json.dumps(properties))
        f.write("}\n")


def _write_csv(slides: list[SlideReadout], path: Path) -> None:
    from stainctl.readout.records import slide_row

    write_table(path, {s.name: slide_row(s) for s in slides}, COLUMNS)


def write_table(path: Path, new_rows: Mapping[str, Mapping[str, object]],
                columns: Sequence[str]) -> None:
    """A CSV of a row per slide (`slide` column first): these slides' rows; rows of other
    slides already in the file are kept (a run over part of a batch does not drop the rest).
    Shared by `readout` and `predict`."""
    rows: dict[str, Mapping[str, object]] = {}
    if path.exists():
        with path.open(newline="") as f:
            for old in csv.DictReader(f):
                if old.get("slide"):
                    rows[old["slide"]] = dict(old)
    rows.update(new_rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows.values():
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    atomic_bytes(path, buf.getvalue().encode())


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
    """The slide's GeoJSON document, as `write_geojson` writes it."""
    return {"type": "FeatureCollection", "features": list(_features(slide)),
            "properties": _collection_properties(slide)}


def _features(slide: SlideReadout) -> Iterator[dict[str, object]]:
    size0 = (slide.width0, slide.height0)
    for t in slide.tiles:
        yield tile_feature(t.x0, t.y0, t.extent0, size0, tile_properties(t.readout))


def _collection_properties(slide: SlideReadout) -> dict[str, object]:
    return {"slide": slide.name, "marker": slide.marker, "coordinates": "level-0 pixels"}


def tile_feature(x0: float, y0: float, extent0: float, size0: tuple[float, float],
                 measurements: Mapping[str, object], classification: str | None = None
                 ) -> dict[str, object]:
    """One tile as a QuPath tile object: its square, clipped to the slide (`size0`: level-0
    width, height), its measurements and, when given, its class. Shared by `predict`."""
    # The part of the tile inside the slide: the measurements cover only that.
    x1 = min(x0 + extent0, size0[0])
    y1 = min(y0 + extent0, size0[1])
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    # QuPath takes numbers only as measurements: a count not made is left out, not null.
    props: dict[str, object] = {"objectType": "tile", "name": f"{x0},{y0}",
                                "measurements": {k: v for k, v in measurements.items()
                                                 if v is not None}}
    if classification is not None:
        props["classification"] = {"name": classification}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": props}


def heatmap_values(slide: SlideReadout) -> np.ndarray:
    """(rows, cols) per-tile value 0-1 (index, else DAB-positive fraction); NaN where no tile."""
    if not slide.tiles:
        return np.full((1, 1), np.nan)
    values = []
    for t in slide.tiles:
        r = t.readout
        value = r.index if r.index is not None else r.positive_fraction
        if r.nuclei is not None and r.index is None:
            value = 0.0  # tissue without nuclei found: nothing positive
        values.append(value)
    return tile_grid([(t.x0, t.y0) for t in slide.tiles], values, slide.tiles[0].extent0,
                     (slide.width0, slide.height0))


def tile_grid(xy0: Sequence[tuple[float, float]] | np.ndarray,
              values: Sequence[float] | np.ndarray, step0: float,
              size0: tuple[float, float]) -> np.ndarray:
    """(rows, cols) array of per-tile `values` at level-0 positions `xy0` on a grid of `step0`
    level-0 px over a slide of `size0` (width, height); NaN where no tile (shared by `predict`)."""
    cols = max(1, math.ceil(size0[0] / step0))
    rows = max(1, math.ceil(size0[1] / step0))
    grid = np.full((rows, cols), np.nan)
    for (x, y), value in zip(xy0, values, strict=True):
        grid[min(rows - 1, round(y / step0)), min(cols - 1, round(x / step0))] = value
    return grid


def heatmap_png(slide: SlideReadout) -> bytes:
    return grid_png(heatmap_values(slide))


def grid_png(values: np.ndarray) -> bytes:
    """(rows, cols) values 0-1, NaN where no tile -> the heat-map PNG (shared by `predict`)."""
    import cv2

    scaled = np.nan_to_num(values, nan=0.0)
    grey = np.clip(scaled * 255, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    rgb[np.isnan(values)] = 255
    rgb = np.repeat(np.repeat(rgb, HEATMAP_TILE_PX, axis=0), HEATMAP_TILE_PX, axis=1)
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - PNG encoding of a uint8 image does not fail
        raise OSError("could not encode the heat map")
    return bytes(data.tobytes())


