"""`stitch`: every translated tile store of the workspace becomes a pyramidal slide.

One output per slide and marker. An output made with the same settings from the same tiles is
skipped; a failed slide is recorded and the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stainctl.errors import SlideError, UsageError
from stainctl.steps.report import (
    BatchResult,
    Progress,
    SilentProgress,
    SlideOutcome,
    params_hash,
    unexpected,
)
from stainctl.stitch.pyramid import PyramidOptions
from stainctl.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StitchOptions:
    pyramid: PyramidOptions = field(default_factory=PyramidOptions)
    markers: tuple[str, ...] = ()  # empty: every marker that has tiles
    output: Path | None = None  # a directory, or a file when one slide is stitched
    level0: bool = False
    background: tuple[int, int, int] | None = None  # None: the store's, else near-white
    force: bool = False


def stitch_slides(ws: Workspace, options: StitchOptions,
                  progress: Progress | None = None) -> BatchResult:
    progress = progress or SilentProgress()
    options.pyramid.validate()
    jobs = [(s, marker, path) for s in ws.manifest.slides()
            for marker, path in ws.tile_stores(s["key"]).items()
            if not options.markers or marker in options.markers]
    if not jobs:
        which = f" for {', '.join(options.markers)}" if options.markers else ""
        raise UsageError(f"nothing to stitch in {ws.root}: no translated tiles{which}; "
                         "run `stainctl translate -w WS --marker M` first")
    single_file = options.output is not None and options.output.suffix.lower() in (".tif",
                                                                                   ".tiff")
    if single_file and len(jobs) > 1:
        raise UsageError(f"-o {options.output} names one file but there are {len(jobs)} "
                         "slide/marker outputs; give a directory or one --marker")
    result = BatchResult("stitch")
    progress.start("stitch", len(jobs))
    for slide, marker, store_path in jobs:
        out = options.output if single_file else _default_output(ws, options, slide, marker)
        assert out is not None
        try:
            outcome = _stitch_one(ws, slide, marker, store_path, out, options)
        except Exception as err:  # one bad slide must not stop the batch
            reason = err.reason if isinstance(err, SlideError) else unexpected(err, out.parent)
            log.debug("%s failed", store_path, exc_info=not isinstance(err, SlideError))
            ws.manifest.set_step(slide["id"], f"stitch:{marker}", "failed", error=reason,
                                 run_id=ws.run_id)
            outcome = SlideOutcome(slide["key"], slide["path"], "failed", f"{marker}: {reason}")
        result.slides.append(outcome)
        progress.log(f"{outcome.slide}: {outcome.state} ({outcome.message})")
        progress.advance()
    return result


def _default_output(ws: Workspace, options: StitchOptions, slide: Any, marker: str) -> Path:
    folder = options.output if options.output is not None else ws.root / "outputs"
    return folder / f"{slide['key']}.{marker}{options.pyramid.suffix}"


def _stitch_one(ws: Workspace, slide: Any, marker: str, store_path: Path, out: Path,
                options: StitchOptions) -> SlideOutcome:
    from stainctl.stitch.stitcher import DEFAULT_BACKGROUND, Overlay, stitch_store
    from stainctl.workspace.tilestore import StoreError, TileStore

    m = ws.manifest
    try:
        store = TileStore.open(store_path, writable=False)
    except StoreError as err:
        raise SlideError(store_path, f"{err}; run `stainctl translate --force` for it") from err
    written = store.written()
    if not store.complete:
        raise SlideError(store_path, f"the {marker} translation is incomplete ({written.sum()} "
                         "tiles so far); run `stainctl translate` again to finish it")
    background = options.background or tuple(store.meta.get("background", DEFAULT_BACKGROUND))
    params = {"pyramid": asdict(options.pyramid), "level0": options.level0,
              "background": list(background), "output": str(out),
              "store": store.generation, "tiles": int(written.sum())}
    phash = params_hash(params)
    step = f"stitch:{marker}"
    done = m.step(slide["id"], step)
    if (not options.force and done is not None and done["state"] == "done"
            and done["params_hash"] == phash and out.exists()):
        return SlideOutcome(slide["key"], slide["path"], "skipped",
                            f"{marker}: already stitched to {out}",
                            {"marker": marker, "output": str(out),
                             "thumbnail": str(options.pyramid.thumbnail(out))})

    m.set_step(slide["id"], step, "running", params_hash=phash, params=params, run_id=ws.run_id)
    overlay = None
    if options.level0:
        if not slide["mpp"] or not slide["width"]:
            raise SlideError(slide["path"], "--level0 needs the slide's level-0 size and mpp, "
                             "which the manifest lacks; run `stainctl tile --force` on it")
        overlay = Overlay(int(slide["width"]), int(slide["height"]), float(slide["mpp"]))
    annotations = {"source": slide["path"], "marker": marker,
                   "model": str(store.meta.get("model", "unknown")),
                   "tile_store": ws.relative(store_path), "stainctl": _version(),
                   "grid": _grid_annotation(store.layout, overlay)}
    res = stitch_store(store, out, options=options.pyramid,
                       background=(int(background[0]), int(background[1]), int(background[2])),
                       name=image_name(slide["key"], marker), annotations=annotations,
                       overlay=overlay)
    m.record_artifact(slide["id"], "stitched", ws.relative(res.path), phash)
    m.record_artifact(slide["id"], "stitched_thumbnail", ws.relative(res.thumbnail), phash)
    m.set_step(slide["id"], step, "done", params_hash=phash, params=params, run_id=ws.run_id)
    return SlideOutcome(
        slide["key"], slide["path"], "done",
        f"{marker}: {res.width} x {res.height} px at {res.mpp:.4g} µm/px -> {res.path}",
        {"marker": marker, "output": str(res.path), "thumbnail": str(res.thumbnail),
         "width": res.width, "height": res.height, "mpp": res.mpp, "tiles": res.tiles})


def image_name(key: str, marker: str) -> str:
    """What viewers (QuPath, OMERO) list the output as: the slide, the marker, and that it is
    generated, so it is not taken for the H&E or for a real stain."""
    return f"{key} {marker} (virtual)"


def _grid_annotation(layout: Any, overlay: Any) -> str:
    """Where tiles meet in the output's pixels, so `evaluate` can measure seams later."""
    scale = layout.mpp / overlay.mpp if overlay is not None else 1.0
    return (f"stride={layout.stride * scale:.8g},offset={layout.overlap // 2 * scale:.8g},"
            f"cols={layout.cols},rows={layout.rows}")


def _version() -> str:
    from stainctl import __version__

    return __version__
