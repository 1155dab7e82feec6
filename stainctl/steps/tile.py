"""`tile`: register slides, find tissue on a thumbnail, lay the tile grid in the manifest."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import DARK, NO_TISSUE, SlideError
from stainctl.slide.grid import GridParams, make_grid, tissue_fractions
from stainctl.slide.inputs import SlideRequest
from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
from stainctl.slide.tissue import DARK_HINT, TissueParams
from stainctl.steps.lifecycle import SlidePlan, SlideStep
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.workspace import (
    GridRecord,
    SlideRecord,
    StepRecord,
    TileCell,
    Workspace,
    atomic_png,
)

if TYPE_CHECKING:
    from stainctl.slide.reader import Slide



@dataclass(frozen=True, kw_only=True)
class TileOptions:
    grid: GridParams = field(default_factory=GridParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    dark_hint: str = DARK_HINT  # what to do about a dark (fluorescence) slide
    dark_code: str = DARK  # its kind of failure (errors.LEFT_OUT in the main job)
    # Gigapixels read at most to make a thumbnail (a slide without a small pyramid level).
    max_thumbnail_read: float = DEFAULT_MAX_READ_GPX
    force: bool = False


def tile_slides(ws: Workspace, requests: list[SlideRequest], options: TileOptions,
                progress: Progress | None = None) -> BatchResult:
    progress = progress or SilentProgress()
    progress.start("tile", len(requests))
    return TileStep(ws, progress, options).run(requests)


@dataclass(frozen=True)
class TileWork:
    fingerprint: str


class TileStep(SlideStep[SlideRequest, TileWork]):
    label = "tile"
    counts_items = True

    def __init__(self, ws: Workspace, progress: Progress, options: TileOptions) -> None:
        super().__init__(ws, progress, force=options.force)
        self.options = options

    def slide(self, item: SlideRequest) -> SlideRecord:
        known = self.manifest.slide_by_path(str(item.path))
        if known is not None:
            return known
        try:
            fp = _fingerprint(item)
        except SlideError:
            fp = ""  # registered all the same, so its failure is recorded
        return self.manifest.add_slide(str(item.path), _stem(item), fp)

    def step_name(self, item: SlideRequest) -> str:
        return Workspace.TILE

    def where(self, item: SlideRequest) -> Path:
        return self.ws.root

    def plan(self, item: SlideRequest, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRequest, TileWork]:
        fp = _fingerprint(item)
        params = {
            "grid": self.options.grid.as_dict(),
            "tissue": asdict(self.options.tissue),
            "mpp_override": item.mpp,
            "fingerprint": fp,
        }
        return SlidePlan(item=item, slide=slide, step=Workspace.TILE, params=params,
                         work=TileWork(fp), previous=previous)

    def skipped(self, plan: SlidePlan[SlideRequest, TileWork]) -> SlideOutcome:
        return SlideOutcome(plan.slide.key, plan.slide.path, "skipped", "already tiled",
                            dict(self.manifest.tile_counts(plan.slide.id))
                            ).warn(plan.slide.warning)

    def run_one(self, plan: SlidePlan[SlideRequest, TileWork]) -> SlideOutcome:
        from stainctl.slide.reader import open_slide

        m, key, slide_id = self.manifest, plan.slide.key, plan.slide.id
        slide = open_slide(plan.item.path, plan.item.mpp)
        try:
            info = slide.describe()
            m.describe_slide(slide_id, fingerprint=plan.work.fingerprint, backend=slide.backend,
                             vendor=slide.vendor, width=int(info["width"]),
                             height=int(info["height"]), levels=_levels_json(info),
                             mpp=slide.mpp, mpp_source=slide.mpp_source,
                             objective_power=slide.objective_power)
            grid, tiles, mask, thumb = _layout(slide, self.options, slide_id, plan.phash,
                                               _reporter(key, self.progress))
        finally:
            slide.close()
        from stainctl.slide.grid import enlargement_warning
        from stainctl.slide.tissue import colour_warning

        # Logged once, with the outcome (lifecycle._report); kept for every later step's line.
        found = [colour_warning(thumb), enlargement_warning(slide.require_mpp(), grid.target_mpp)]
        warning = "; ".join(w for w in found if w) or None
        m.set_slide_warning(slide_id, warning)

        _save_png(self.ws, slide_id, self.ws.thumbnail_path(key), thumb, "thumbnail")
        _save_png(self.ws, slide_id, self.ws.tissue_mask_path(key),
                  mask.astype(np.uint8) * 255, "tissue_mask")
        m.replace_grid(grid, tiles)
        counts = m.tile_counts(slide_id)
        message = f"{counts['tiles_tissue']} of {counts['tiles_total']} tiles on tissue"
        return SlideOutcome(key, plan.slide.path, "done", message, dict(counts)).warn(warning)


def _fingerprint(req: SlideRequest) -> str:
    from stainctl.slide.fingerprint import fingerprint
    from stainctl.slide.reader import check_exists

    if req.error:
        raise SlideError(req.path, req.error)
    check_exists(req.path)
    try:
        return fingerprint(req.path)
    except OSError as err:
        raise SlideError(req.path, f"cannot read the file ({err.strerror})") from err


def _reporter(key: str, progress: Progress, every: float = 30.0) -> Callable[[str, float], None]:
    """A callback for long per-slide work: a progress line at most every `every` seconds."""
    import time

    last = [time.monotonic()]

    def report(what: str, fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            progress.log(f"{key}: {what} {fraction:.0%}")

    return report


def _layout(slide: Slide, options: TileOptions, slide_id: int, phash: str,
            report: Callable[[str, float], None] | None = None
            ) -> tuple[GridRecord, list[TileCell], NDArray[np.bool_], NDArray[np.uint8]]:
    from stainctl.slide.thumbnail import read_thumbnail, thumbnail_mpp
    from stainctl.slide.tissue import check_brightfield, tissue_mask

    mpp = slide.require_mpp()
    w0, h0 = slide.dimensions
    t_mpp = thumbnail_mpp(mpp, w0, h0)
    thumb = read_thumbnail(slide, t_mpp, max_read_gpx=options.max_thumbnail_read,
                           report=report)
    dark = check_brightfield(thumb, slide.path, options.tissue.allow_dark, options.dark_hint,
                            options.dark_code)
    mask = tissue_mask(thumb, t_mpp, options.tissue, dark=dark)
    if not mask.any():
        raise SlideError(slide.path, f"{slide.path}: no tissue found on the thumbnail; if the "
                         "tissue is faint, lower --tissue-threshold (now "
                         f"{options.tissue.saturation})", NO_TISSUE)
    gp = options.grid
    grid = make_grid(w0, h0, mpp, gp, slide.level_downsamples)
    frac = tissue_fractions(mask, w0, h0, grid)
    keep = frac >= gp.min_tissue
    if not keep.any():
        raise SlideError(slide.path, f"{slide.path}: no tile has at least {gp.min_tissue:.0%} "
                         f"tissue (best: {frac.max():.0%}); lower --min-tissue", NO_TISSUE)
    xs, ys = grid.origins()
    cols = np.tile(np.arange(grid.cols), grid.rows)
    rows = np.repeat(np.arange(grid.rows), grid.cols)
    # Row by row, so manifest ids grow in raster order.
    tiles = [TileCell(col=c, row=r, x=x, y=y, tissue=f, in_tissue=k)
             for c, r, x, y, f, k in zip(cols.tolist(), rows.tolist(), xs.tolist(), ys.tolist(),
                                         frac.astype(float).tolist(), keep.tolist(), strict=True)]
    record = GridRecord(
        slide_id=slide_id, params_hash=phash, target_mpp=grid.mpp,
        tile_size=gp.tile_size, overlap=gp.overlap, extent0=grid.extent0,
        stride0=grid.stride0, cols=grid.cols, rows=grid.rows, min_tissue=gp.min_tissue)
    return record, tiles, mask, thumb


def _save_png(ws: Workspace, slide_id: int, path: Path, image: NDArray[np.uint8],
              kind: str) -> None:
    atomic_png(path, image)
    ws.manifest.record_artifact(slide_id, kind, ws.relative(path))


def _levels_json(info: Mapping[str, object]) -> str:
    import json

    return json.dumps({"dimensions": info["level_dimensions"],
                       "downsamples": info["level_downsamples"]})


def _stem(req: SlideRequest) -> str:
    name = req.path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if req.path.is_dir() else req.path.stem
