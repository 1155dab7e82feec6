"""`tile`: register slides, find tissue on a thumbnail, lay the tile grid in the manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stainctl.errors import SlideError
from stainctl.slide.grid import GridParams, make_grid, tissue_fractions
from stainctl.slide.inputs import SlideRequest
from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
from stainctl.slide.tissue import DARK_HINT, TissueParams
from stainctl.steps.report import (
    BatchResult,
    Progress,
    SilentProgress,
    SlideOutcome,
    params_hash,
    unexpected,
)
from stainctl.workspace import Workspace, atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileOptions:
    grid: GridParams = field(default_factory=GridParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    dark_hint: str = DARK_HINT  # what to do about a dark (fluorescence) slide
    # Gigapixels read at most to make a thumbnail (a slide without a small pyramid level).
    max_thumbnail_read: float = DEFAULT_MAX_READ_GPX
    force: bool = False


def tile_slides(ws: Workspace, requests: list[SlideRequest], options: TileOptions,
                progress: Progress | None = None) -> BatchResult:
    progress = progress or SilentProgress()
    options.grid.validate()
    result = BatchResult("tile")
    progress.start("tile", len(requests))
    for req in requests:
        try:
            outcome = _tile_one(ws, req, options, progress)
        except Exception as err:  # one bad slide must not stop the batch
            reason = err.reason if isinstance(err, SlideError) else unexpected(err, ws.root)
            log.debug("%s failed", req.path, exc_info=not isinstance(err, SlideError))
            slide = (ws.manifest.slide_by_path(str(req.path))
                     or ws.manifest.add_slide(str(req.path), _stem(req), ""))
            ws.manifest.set_step(slide["id"], "tile", "failed", error=reason, run_id=ws.run_id)
            outcome = SlideOutcome(slide["key"], str(req.path), "failed", reason,
                                   code=getattr(err, "code", None))
        result.slides.append(outcome)
        progress.log(_line(outcome))
        progress.advance()
    return result


def _tile_one(ws: Workspace, req: SlideRequest, options: TileOptions,
              progress: Progress) -> SlideOutcome:
    from stainctl.slide.fingerprint import fingerprint
    from stainctl.slide.reader import check_exists, open_slide

    if req.error:
        raise SlideError(req.path, req.error)
    check_exists(req.path)
    try:
        fp = fingerprint(req.path)
    except OSError as err:
        raise SlideError(req.path, f"cannot read the file ({err.strerror})") from err
    m = ws.manifest
    row = m.add_slide(str(req.path), _stem(req), fp)
    params = {
        "grid": options.grid.as_dict(),
        "tissue": vars(options.tissue),
        "mpp_override": req.mpp,
        "fingerprint": fp,
    }
    phash = params_hash(params)
    done = m.step(row["id"], "tile")
    if (not options.force and done is not None and done["state"] == "done"
            and done["params_hash"] == phash):
        return SlideOutcome(row["key"], str(req.path), "skipped", "already tiled",
                            m.tile_counts(row["id"]))

    m.set_step(row["id"], "tile", "running", params_hash=phash, params=params,
               run_id=ws.run_id)
    slide = open_slide(req.path, req.mpp)
    try:
        info = slide.describe()
        m.update_slide(row["id"], fingerprint=fp, backend=slide.backend, vendor=slide.vendor,
                       width=info["width"], height=info["height"],
                       levels=_levels_json(info), mpp=slide.mpp, mpp_source=slide.mpp_source,
                       objective_power=slide.objective_power)
        grid_row, tiles, mask, thumb = _layout(slide, options, _reporter(row["key"], progress))
    finally:
        slide.close()
    from stainctl.slide.tissue import colour_warning

    warning = colour_warning(thumb)
    if warning:
        log.warning("%s: %s", req.path, warning)

    out_dir = ws.slide_dir(row["key"])
    _save_png(ws, row["id"], out_dir / "thumbnail.png", thumb, "thumbnail")
    _save_png(ws, row["id"], out_dir / "tissue_mask.png",
              mask.astype(np.uint8) * 255, "tissue_mask")
    m.replace_grid(row["id"], {**grid_row, "params_hash": phash}, tiles)
    m.set_step(row["id"], "tile", "done", params_hash=phash, params=params, run_id=ws.run_id)
    counts: dict[str, Any] = dict(m.tile_counts(row["id"]))
    message = f"{counts['tiles_tissue']} of {counts['tiles_total']} tiles on tissue"
    if warning:
        counts["warning"] = warning
        message += f"; warning: {warning}"
    return SlideOutcome(row["key"], str(req.path), "done", message, counts)


def _reporter(key: str, progress: Progress, every: float = 30.0) -> Any:
    """A callback for long per-slide work: a progress line at most every `every` seconds."""
    import time

    last = [time.monotonic()]

    def report(what: str, fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            progress.log(f"{key}: {what} {fraction:.0%}")

    return report


def _layout(slide: Any, options: TileOptions, report: Any = None
            ) -> tuple[dict[str, Any], list[tuple[Any, ...]], np.ndarray, np.ndarray]:
    from stainctl.slide.thumbnail import read_thumbnail, thumbnail_mpp
    from stainctl.slide.tissue import check_brightfield, tissue_mask

    mpp = slide.require_mpp()
    w0, h0 = slide.dimensions
    t_mpp = thumbnail_mpp(mpp, w0, h0)
    thumb = read_thumbnail(slide, t_mpp, max_read_gpx=options.max_thumbnail_read,
                           report=report)
    dark = check_brightfield(thumb, slide.path, options.tissue.allow_dark, options.dark_hint)
    mask = tissue_mask(thumb, t_mpp, options.tissue, dark=dark)
    if not mask.any():
        raise SlideError(slide.path, "no tissue found on the thumbnail; if the tissue is "
                         "faint, lower --tissue-threshold (now "
                         f"{options.tissue.saturation})")
    gp = options.grid
    grid = make_grid(w0, h0, mpp, gp)
    frac = tissue_fractions(mask, w0, h0, grid)
    keep = frac >= gp.min_tissue
    if not keep.any():
        raise SlideError(slide.path, f"no tile has at least {gp.min_tissue:.0%} tissue "
                         f"(best: {frac.max():.0%}); lower --min-tissue")
    xs, ys = grid.origins()
    cols = np.tile(np.arange(grid.cols), grid.rows)
    rows = np.repeat(np.arange(grid.rows), grid.cols)
    tiles = list(zip(cols.tolist(), rows.tolist(), xs.tolist(), ys.tolist(),
                     frac.astype(float).tolist(), keep.astype(int).tolist(), strict=True))
    grid_row = {
        "target_mpp": gp.target_mpp, "tile_size": gp.tile_size, "overlap": gp.overlap,
        "extent0": grid.extent0, "stride0": grid.stride0, "cols": grid.cols,
        "rows": grid.rows, "min_tissue": gp.min_tissue,
    }
    return grid_row, tiles, mask, thumb


def _save_png(ws: Workspace, slide_id: int, path: Any, image: np.ndarray, kind: str) -> None:
    import cv2

    with atomic_path(path) as tmp:
        bgr = image[..., ::-1] if image.ndim == 3 else image
        if not cv2.imwrite(str(tmp), bgr):
            raise SlideError(path, "could not write the PNG (disk full or not writable?)")
    ws.manifest.record_artifact(slide_id, kind, ws.relative(path))


def _levels_json(info: dict[str, Any]) -> str:
    import json

    return json.dumps({"dimensions": info["level_dimensions"],
                       "downsamples": info["level_downsamples"]})


def _stem(req: SlideRequest) -> str:
    name = req.path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if req.path.is_dir() else req.path.stem


def _line(o: SlideOutcome) -> str:
    return f"{o.slide}: {o.state}" + (f" ({o.message})" if o.message else "")
