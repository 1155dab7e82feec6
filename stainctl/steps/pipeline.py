"""The main job in one command: tile -> filter -> translate -> stitch, then side-by-side PNGs
(`side_by_side.py`).

Each step is the same resumable step the separate commands run, on one workspace; a slide that
fails at any step is reported with that step's reason and the others go on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stainctl.errors import LEFT_OUT
from stainctl.slide.grid import GridParams
from stainctl.slide.inputs import SlideRequest
from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
from stainctl.steps import MAIN_JOB_MIN_TISSUE
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.steps.translate import TranslateOptions
from stainctl.stitch.pyramid import PyramidOptions
from stainctl.workspace import Workspace

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from stainctl.steps.stitch import StitchOptions


@dataclasses.dataclass
class ChainTally:
    """What the chained steps of a whole-slide job (the main job, `normalize`) did to each
    slide: its first failure, and whether any step did work on it (else it was already done)."""

    failed: dict[str, SlideOutcome] = dataclasses.field(default_factory=dict)
    worked: set[str] = dataclasses.field(default_factory=set)

    def keep(self, result: BatchResult) -> None:
        for o in result.failed:
            self.failed.setdefault(o.slide, o)
        self.worked.update(o.slide for o in result.slides if o.state == "done")

    def run(self, ws: Workspace, steps: list[tuple[str, Callable[[], BatchResult]]],
            label: str) -> BatchResult | None:
        """Run the steps in order; once one leaves no slide done, the failures so far as the
        job's result (the reason, not "nothing to do" from the next step); else None."""
        for name, step in steps:
            self.keep(step())
            if not ws.manifest.slides_done(name):
                return BatchResult(label, list(self.failed.values()))
        return None


def run_main_job(ws: Workspace, requests: list[SlideRequest], options: TranslateOptions,
                 output: Path, pyramid: PyramidOptions | None = None,
                 progress: Progress | None = None, *,
                 max_thumbnail_read: float | None = None, readout: bool = False) -> BatchResult:
    from stainctl.models.registry import models_dir, required_cards
    from stainctl.models.weights import check_installed
    from stainctl.steps.filter import FilterOptions, filter_slides
    from stainctl.steps.stitch import StitchOptions, output_path, stitch_slides
    from stainctl.steps.tile import TileOptions, tile_slides
    from stainctl.steps.translate import grid_tile_size, marker_model, translate_slides

    progress = progress or SilentProgress()
    if options.scheduler:  # an unreachable scheduler: say so before tiling anything
        from stainctl.cluster.connect import probe

        probe(options.scheduler)
    elif not options.on_cluster and options.device.startswith("cuda"):
        # No GPU here: say so before tiling anything, not after tile and filter.
        from stainctl.models.encoders import resolve_device

        resolve_device(options.device)
    directory = models_dir(options.models_dir)
    card = marker_model(options.marker, directory)
    # Missing weights, the card's or those of the models it runs with (base, flow, encoder):
    # say so before tiling anything.
    check_installed(required_cards(card, directory), directory, verify=True)
    options = dataclasses.replace(options, marker=card.name)
    grid = GridParams(target_mpp=card.input_mpp, tile_size=grid_tile_size(card, options),
                      min_tissue=MAIN_JOB_MIN_TISSUE)
    pyramid = pyramid or PyramidOptions()
    tally = ChainTally()
    steps = [
        (Workspace.TILE, lambda: tile_slides(ws, requests, TileOptions(
            grid=grid, force=options.force,
            max_thumbnail_read=max_thumbnail_read or DEFAULT_MAX_READ_GPX,
            dark_hint="a virtual IHC slide is made from a brightfield H&E slide, so this one "
                      "was left out", dark_code=LEFT_OUT), progress)),
        (Workspace.FILTER,
         lambda: filter_slides(ws, FilterOptions(force=options.force,
                                                 scheduler=options.scheduler), progress)),
        (Workspace.translate_step(card.name), lambda: translate_slides(ws, options, progress)),
    ]
    stuck = tally.run(ws, steps, "translate")
    if stuck is not None:
        return stuck
    stitch = StitchOptions(pyramid=pyramid, markers=(card.name,), output=output,
                           force=options.force)
    stitched = stitch_slides(ws, stitch, progress)
    tally.keep(stitched)
    result = BatchResult("translate")
    max_read = max_thumbnail_read or DEFAULT_MAX_READ_GPX
    virtual: dict[str, Path] = {}  # slide -> its stitched virtual slide, for --readout
    for o in stitched.slides:
        if o.state == "failed" or o.slide in tally.failed:
            continue
        virtual[o.slide] = output_path(ws, stitch, o.slide, card.name)
        result.slides.append(side_by_side_outcome(ws, stitch, o, card.name, tally.worked,
                                                  max_read))
    if readout:
        from stainctl.steps.readout import read_out_virtual

        read_out_virtual(result.slides, virtual, card.marker or card.name, output / "readout",
                         progress)
    result.slides.extend(tally.failed.values())
    return result



def side_by_side_outcome(ws: Workspace, stitch: StitchOptions, o: SlideOutcome, name: str,
                         worked: set[str], max_read: float, *,
                         labels: tuple[str, str] | None = None,
                         target: NDArray[np.uint8] | None = None,
                         target_label: str = "target") -> SlideOutcome:
    """A stitched slide's outcome with its side-by-side PNG written (the input slide beside
    the output `name`, and `target` after them when given); a PNG that cannot be written is
    said in the outcome, which stays done with its stitched output."""
    from stainctl.steps.side_by_side import side_by_side, side_by_side_errors
    from stainctl.steps.stitch import output_path

    slide = ws.manifest.slide_by_path(o.path)
    assert slide is not None and slide.mpp is not None  # stitched slides were tiled
    stitched_file = output_path(ws, stitch, o.slide, name)
    state = "done" if o.slide in worked else "skipped"
    try:
        pair = side_by_side(o.path, slide.mpp, stitched_file,
                            stitch.pyramid.thumbnail(stitched_file), name,
                            unchanged=o.state == "skipped", max_read_gpx=max_read,
                            labels=labels, target=target, target_label=target_label)
    except side_by_side_errors() as err:
        # The output is made and kept: only its preview is missing. Say why, and go on with
        # the other slides.
        return SlideOutcome(
            o.slide, o.path, state,
            f"{o.message}; the side-by-side PNG could not be written ({_reason(err)})",
            o.details)
    o.details["side_by_side"] = str(pair)
    return SlideOutcome(o.slide, o.path, state, f"{o.message}; input beside it: {pair.name}"
                        if labels else f"{o.message}; H&E beside it: {pair.name}",
                        o.details).warn(slide.warning)


def _reason(err: Exception) -> str:
    """The cause in a line: an OS error with the file it names (a rename's target, not the
    temporary beside it)."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename2 or err.filename}: {err.strerror or err}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
