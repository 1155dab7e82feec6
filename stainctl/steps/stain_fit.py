"""Fitting a classical stain normalisation once for one slide of a workspace.

A seeded sample of the slide's tissue tiles (at the grid's resolution) gives the slide's stain
parameters; its glass colour comes from its glassiest tile, else its thumbnail. The fit is kept
in the manifest (`stain_fits`, shown by `status`) and returned as the transform every tile of the
slide goes through.
"""

from __future__ import annotations

import numpy as np

from stainctl.engines.base import stable_seed
from stainctl.normalize.classical import Normaliser, StainTransform
from stainctl.normalize.sample import SAMPLE_TILES, from_tiles, glass_of, plausible_glass
from stainctl.workspace import GridRecord, SlideRecord, Workspace


def fit_slide(ws: Workspace, slide: SlideRecord, grid: GridRecord, normaliser: Normaliser,
              step: str) -> StainTransform:
    from stainctl.errors import SlideError, UsageError
    from stainctl.slide.tiles import TileSource
    from stainctl.steps.glass import glass_tile, thumbnail_glass

    tiles = ws.manifest.tissue_tiles(slide.id)
    if not tiles:
        raise SlideError(slide.path, "no tissue tiles to fit the stain normalisation on")
    # Densest tissue first, then a seeded choice among them: the same sample on every run.
    tiles = sorted(tiles, key=lambda t: (-t.tissue, t.row, t.col))[:4 * SAMPLE_TILES]
    rng = np.random.default_rng(stable_seed("stain-fit", slide.key))
    picks = sorted(rng.permutation(len(tiles))[:SAMPLE_TILES])
    source = TileSource(slide.path, grid.extent0, grid.tile_size)
    images = [source.read(tiles[i].x, tiles[i].y) for i in picks]
    # No glass to measure (tissue edge to edge): the sample's own, else a neutral 240.
    glass = plausible_glass(glass_of(glass_tile(ws, slide, grid, source, 0))) \
        or plausible_glass(thumbnail_glass(ws, slide.key))
    sample = from_tiles(images, slide.path, seed=stable_seed("pixels", slide.key), glass=glass)
    try:
        transform = normaliser.for_slide(sample)
    except UsageError as err:  # this slide's stains, not the command's: the others go on
        raise SlideError(slide.path, str(err)) from None
    fit = transform.fit
    ws.manifest.record_stain_fit(slide.id, step, fit.method, fit.source, fit.target)
    return transform
