"""Low-resolution views of a slide, read in strips so memory stays bounded for any slide size."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from stainctl.errors import SlideError
from stainctl.slide.reader import Slide

# Rows of the source level decoded at a time when shrinking it to a thumbnail.
STRIP_PIXELS = 32_000_000
# A slide whose coarsest usable level is bigger than this (in gigapixels) is refused: its
# thumbnail would be made by decoding all of it (at ~50 Mpx/s, 10 Gpx take ~3-4 minutes; a header
# claiming 10^6 x 10^6 px, hours). `tile --max-thumbnail-read` raises it.
DEFAULT_MAX_READ_GPX = 10.0


def thumbnail_mpp(slide_mpp: float, width: int, height: int) -> float:
    """4-8 µm/px: coarse enough that cells blur into tissue, as the common tilers use; finer
    (down to 4) for small slides, coarser only to keep the long side under 8192 px."""
    long_um = max(width, height) * slide_mpp
    mpp = min(8.0, max(4.0, long_um / 1024))
    return max(mpp, long_um / 8192, slide_mpp)


def read_thumbnail(slide: Slide, mpp: float, *, max_read_gpx: float = DEFAULT_MAX_READ_GPX,
                   report: Callable[[str, float], None] | None = None) -> np.ndarray:
    """RGB thumbnail at `mpp` µm/px, built from the best level, a strip at a time. A level of
    more than `max_read_gpx` gigapixels is refused; `report(what, fraction)` hears progress."""
    import cv2

    w0, h0 = slide.dimensions
    slide_mpp = slide.require_mpp()
    scale = slide_mpp / mpp  # output pixels per level-0 pixel
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    level = slide.best_level(1 / scale)
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    check_read_size(slide, level, max_read_gpx)
    out = np.empty((th, tw, 3), np.uint8)
    rows_per_strip = max(1, int(STRIP_PIXELS / max(lw, 1) * (th / lh)))
    for r0 in range(0, th, rows_per_strip):
        r1 = min(th, r0 + rows_per_strip)
        ly0 = math.floor(r0 * lh / th)
        ly1 = min(lh, math.ceil(r1 * lh / th))
        strip = slide.read_region(0, round(ly0 * ds), level, lw, ly1 - ly0)
        out[r0:r1] = cv2.resize(strip, (tw, r1 - r0), interpolation=cv2.INTER_AREA)
        if report is not None:
            report("reading the thumbnail", r1 / th)
    return out


def check_read_size(slide: Slide, level: int, max_gpx: float) -> None:
    """Refuse to decode a whole level bigger than `max_gpx` gigapixels."""
    lw, lh = slide.level_dimensions[level]
    gpx = lw * lh / 1e9
    if gpx <= max_gpx:
        return
    what = "has no low-resolution level" if level == 0 else "has no small enough level"
    raise SlideError(slide.path, f"{what}: its thumbnail means decoding {lw:,} x {lh:,} px "
                     f"({gpx:,.1f} gigapixels), more than "
                     f"--max-thumbnail-read {max_gpx:g}; add a pyramid (e.g. `vips tiffsave "
                     "--tile --pyramid`) or raise --max-thumbnail-read")
