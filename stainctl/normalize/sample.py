"""Tissue pixels and glass colour of a reference image or slide, and of a workspace slide.

A reference must show stained tissue: a uniform image, one that is only glass, or one without
haematoxylin cannot define an H&E stain, and is refused with one line naming the file (exit 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import UsageError

SAMPLE_TILES = 32  # tissue tiles a fit reads: enough pixels, a few seconds on a large slide
MAX_PIXELS = 1_000_000  # tissue pixels a fit uses (seeded subsample)
MIN_TISSUE_PIXELS = 2_000
# Below this 90th percentile of haematoxylin optical density the reference has no nuclei stain.
MIN_HAEMATOXYLIN = 0.05
UNIFORM_STD = 2.0  # grey levels: a reference flatter than this is one colour


@dataclass(frozen=True, kw_only=True)
class StainSample:
    """What a fit needs of one image or slide: its tissue pixels and the colour of its glass."""

    pixels: NDArray[np.uint8]  # (N, 3) RGB tissue pixels
    glass: tuple[int, int, int]  # RGB of the glass (the light the stains absorb from)
    name: str
    # A picture of it (a reference image, or a slide's densest sampled tile), for the learned
    # method's conditioning and the side-by-side PNG; None where not kept.
    image: NDArray[np.uint8] | None = None

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.shape[1] != 3:
            raise ValueError("pixels must be (N, 3)")


def tissue_pixels(rgb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Pixels darker than glass or clearly coloured (the rule of `stain/tissue.py`, plus
    saturation, so pale eosin counts)."""
    from stainctl.stain.tissue import TISSUE_BELOW

    f = rgb[..., :3].astype(np.int16)
    spread = f.max(axis=-1) - f.min(axis=-1)
    return (f.mean(axis=-1) < TISSUE_BELOW) | (spread > 30)


def glass_of(rgb: NDArray[np.uint8]) -> tuple[int, int, int] | None:
    """Median colour of the glass pixels of `rgb`, or None where there are too few."""
    from stainctl.stain.tissue import glass_mask

    glass = rgb[..., :3][glass_mask(rgb)]
    if len(glass) < 100:
        return None
    r, g, b = (int(np.rint(v)) for v in np.median(glass, axis=0))
    return r, g, b


def plausible_glass(colour: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """`colour` where it can be glass (bright, nearly grey), else None: a slide that is tissue
    from edge to edge has no glass to measure, and its 'background' is stained."""
    if colour is None or min(colour) < 200 or max(colour) - min(colour) > 30:
        return None
    return colour


def from_tiles(tiles: list[NDArray[np.uint8]], name: str, seed: int = 0,
               glass: tuple[int, int, int] | None = None,
               image: NDArray[np.uint8] | None = None) -> StainSample:
    """A sample from tiles: their tissue pixels (subsampled, seeded) and their glass."""
    if not tiles:
        raise UsageError(f"{name}: no tiles to sample")
    flat = np.concatenate([t[..., :3].reshape(-1, 3) for t in tiles])
    mask = tissue_pixels(flat[None])[0]
    pixels = flat[mask]
    if len(pixels) > MAX_PIXELS:
        rng = np.random.default_rng(seed)
        pixels = pixels[np.sort(rng.choice(len(pixels), MAX_PIXELS, replace=False))]
    if glass is None:
        glass = plausible_glass(glass_of(flat[None][:, ~mask])) if (~mask).sum() >= 100 \
            else None
    return StainSample(pixels=pixels, glass=glass or (240, 240, 240), name=name, image=image)


def check_reference(sample: StainSample, image: NDArray[np.uint8], fix: str = "--target"
                    ) -> None:
    """Refuse a reference that cannot define an H&E stain (UsageError, exit 2); `fix` names
    the option to change."""
    from stainctl.stain.deconvolution import hed_from_rgb

    where = sample.name
    if float(image.reshape(-1, 3).astype(np.float32).std(axis=0).max()) < UNIFORM_STD:
        raise UsageError(f"{where}: the reference is a uniform colour, not stained tissue; "
                         f"give an H&E image or slide with tissue ({fix})")
    if len(sample.pixels) < MIN_TISSUE_PIXELS:
        raise UsageError(f"{where}: the reference shows only glass (no tissue found); "
                         f"give an H&E image or slide with tissue ({fix})")
    od = -np.log(np.maximum(sample.pixels.astype(np.float64), 1.0) / 255.0)
    h = od @ hed_from_rgb()[:, 0]
    if float(np.percentile(h, 90)) < MIN_HAEMATOXYLIN:
        raise UsageError(f"{where}: the reference has no haematoxylin (no blue-purple nuclei "
                         "stain), so an H&E stain cannot be taken from it; give an H&E image "
                         f"or slide ({fix})")


def load_reference(path: str | Path, target_mpp: float = 0.5, tile_size: int = 512,
                   seed: int = 0) -> StainSample:
    """The reference `--target`: an image (used whole, at most 4,096 px a side) or a slide (its
    tissue tiles at `target_mpp`, sampled on a thumbnail's tissue)."""
    import cv2

    from stainctl.errors import SlideError
    from stainctl.slide.grid import snapped_scale
    from stainctl.slide.reader import open_slide

    path = Path(path)
    name = str(path)
    try:
        slide = open_slide(path)
    except SlideError as err:
        raise UsageError(f"--target {err}") from None
    try:
        w, h = slide.dimensions
        if slide.mpp is None or max(w, h) * slide.mpp / target_mpp <= 4096:
            # Level-0 px per output px: the target resolution, at most 4,096 px a side.
            down = max(1.0 if slide.mpp is None else target_mpp / slide.mpp, max(w, h) / 4096)
            # As the tile grid: a level within SNAP_TOLERANCE of it is used as stored, not
            # resampled (a resize by 0.998 is a blur the slide's own tiles do not have, and a
            # slide normalised to itself would then change).
            down, snapped = snapped_scale(down, slide.level_downsamples)
            level = slide.best_level(down) if snapped is None else snapped
            lw, lh = slide.level_dimensions[level]
            image = slide.read_region(0, 0, level, lw, lh)
            size = (max(1, round(w / down)), max(1, round(h / down)))
            if snapped is None and size != (lw, lh):
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            tiles = [image]
            picture = image
        else:
            tiles = _slide_tiles(slide, target_mpp, tile_size, seed)
            image = np.concatenate([t.reshape(-1, 3) for t in tiles])[None]
            picture = max(tiles, key=lambda t: float(tissue_pixels(t).mean())) if tiles \
                else image
    finally:
        slide.close()
    sample = from_tiles(tiles, name, seed, image=picture)
    check_reference(sample, image)
    return sample


def _slide_tiles(slide: object, target_mpp: float, tile_size: int,
                 seed: int) -> list[NDArray[np.uint8]]:
    """Up to SAMPLE_TILES tiles of a large slide, mostly tissue, found on a thumbnail."""
    from stainctl.slide.grid import snapped_scale
    from stainctl.slide.reader import Slide
    from stainctl.slide.thumbnail import read_thumbnail
    from stainctl.slide.tiles import read_tile

    assert isinstance(slide, Slide) and slide.mpp is not None
    thumb_mpp = 8.0
    thumb = read_thumbnail(slide, thumb_mpp)
    mask = tissue_pixels(thumb)
    cell = max(1, round(tile_size * target_mpp / thumb_mpp))
    rows, cols = mask.shape[0] // cell, mask.shape[1] // cell
    frac = mask[:rows * cell, :cols * cell].reshape(rows, cell, cols, cell).mean(axis=(1, 3))
    candidates = np.argwhere(frac >= 0.5)
    if len(candidates) == 0:
        candidates = np.argwhere(frac >= frac.max()) if frac.size else np.zeros((0, 2), int)
    rng = np.random.default_rng(seed)
    picks = candidates[rng.permutation(len(candidates))[:SAMPLE_TILES]]
    # The grid's rule: a level within SNAP_TOLERANCE of the target is read as stored.
    scale, _ = snapped_scale(target_mpp / slide.mpp, slide.level_downsamples)
    extent0 = tile_size * scale
    step0 = thumb.shape[1] and slide.dimensions[0] / thumb.shape[1]
    return [read_tile(slide, math.floor(c * cell * step0), math.floor(r * cell * step0),
                      extent0, tile_size) for r, c in picks]
