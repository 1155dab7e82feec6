"""The files a per-slide readout is written to, shared by `readout` and `predict`:

  * a CSV with a row per slide (`write_csv`), the columns given in a stable order;
  * a GeoJSON FeatureCollection of tile polygons in level-0 pixel coordinates, each carrying its
    measurements (`write_geojson`), in the form QuPath imports as-is (objectType "tile",
    classification, measurements);
  * a heat-map PNG of one value per tile over the slide's thumbnail (`write_heatmap`).
Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.workspace.atomic import atomic_path

HEATMAP_WIDTH = 1024  # px, at most


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k, "")) for k in columns})
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_geojson(path: Path, xy0: np.ndarray, extent0: float,
                  measurements: Sequence[Mapping[str, Any]],
                  classes: Sequence[str | None] | None = None) -> Path:
    """Tile i: the square (xy0[i], xy0[i] + extent0) in level-0 px, its measurements and, when
    given, its class."""
    features = []
    for i, (x, y) in enumerate(np.asarray(xy0, np.float64)):
        x1, y1 = x + extent0, y + extent0
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        props: dict[str, Any] = {"objectType": "tile",
                                 "measurements": {k: _json_number(v)
                                                  for k, v in measurements[i].items()}}
        if classes is not None and classes[i] is not None:
            props["classification"] = {"name": classes[i]}
        features.append({"type": "Feature", "geometry": {"type": "Polygon",
                                                         "coordinates": [ring]},
                         "properties": props})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_heatmap(path: Path, xy0: np.ndarray, values: np.ndarray, stride0: float,
                  size0: tuple[int, int], thumbnail: Path | None = None,
                  vmin: float = 0.0, vmax: float = 1.0, cmap: str = "magma") -> Path:
    """One value per tile (top-left `xy0`, grid step `stride0`, slide `size0` = level-0 width,
    height) coloured over the thumbnail (or white), at most HEATMAP_WIDTH px wide."""
    import cv2
    import matplotlib

    width0, height0 = size0
    cols = max(1, math.ceil(width0 / stride0))
    rows = max(1, math.ceil(height0 / stride0))
    grid = np.full((rows, cols), np.nan)
    for (x, y), v in zip(np.asarray(xy0), np.asarray(values, np.float64), strict=True):
        r, c = round(float(y) / stride0), round(float(x) / stride0)
        if 0 <= r < rows and 0 <= c < cols:
            grid[r, c] = v
    cell = max(1, min(64, HEATMAP_WIDTH // cols))
    h, w = rows * cell, cols * cell
    base = np.full((h, w, 3), 255, np.uint8)
    if thumbnail is not None and thumbnail.is_file():
        thumb = cv2.imread(str(thumbnail), cv2.IMREAD_COLOR)
        if thumb is not None:
            # The thumbnail spans the slide; the grid may reach past its edge.
            tw, th = round(w * width0 / (cols * stride0)), round(h * height0 / (rows * stride0))
            base[:th, :tw] = cv2.resize(thumb, (tw, th), interpolation=cv2.INTER_AREA)[..., ::-1]
    colours = matplotlib.colormaps[cmap](np.clip((grid - vmin) / (vmax - vmin or 1), 0, 1))
    colours = (colours[..., :3] * 255).astype(np.uint8)
    big = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    known = np.repeat(np.repeat(np.isfinite(grid), cell, axis=0), cell, axis=1)
    out = base.copy()
    out[known] = (0.35 * base[known] + 0.65 * big[known]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ok, data = cv2.imencode(".png", out[..., ::-1])
        if not ok:
            raise OSError(f"could not encode {path}")
        tmp.write_bytes(data.tobytes())
    return path
