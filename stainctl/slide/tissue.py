"""Tissue mask from a thumbnail: HSV saturation threshold and morphology.

Brightfield stains (H&E, IHC) are coloured on near-white glass, so saturation separates tissue
from background. A dark background means fluorescence or dark-field: refused unless allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stainctl.errors import DARK, SlideError

# Brightfield glass is the brightest part of any slide; on a fluorescence slide even the 90th
# percentile of brightness is near black (measured: 18/255 on the DAPI NDPI, >= 186 on H&E/IHC).
DARK_P90 = 100


@dataclass(frozen=True)
class TissueParams:
    saturation: int = 15  # HSV saturation (0-255) above which a pixel is tissue
    # Pale stains (IHC counterstain, some scanners) are barely saturated but still darker than
    # the glass: pixels this many grey levels below the glass level count as tissue too.
    below_glass: int = 20
    close_um: float = 32.0  # closing merges nuclei and pale cytoplasm into one region
    open_um: float = 8.0
    min_object_um2: float = 5_000.0  # specks smaller than this are dropped
    allow_dark: bool = False

    def __post_init__(self) -> None:
        from stainctl.errors import UsageError

        if not 0 <= self.saturation <= 255:
            raise UsageError(f"--tissue-threshold must be in 0..255, got {self.saturation}")


def background_brightness(thumb: np.ndarray) -> float:
    import cv2

    from stainctl.slide.quantile import percentile_u8

    return percentile_u8(cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY), 90)


DARK_HINT = "pass --allow-dark to process it anyway"

# Glass is near-white or grey: its channels differ by a few levels (measured on the brightfield
# slides in the test data: at most 10; an all-tissue H&E crop's brightest pixels: 42). CMU-1 with
# its YCbCr pixels read as RGB: (244, 127, 128), 117 apart.
TINT_LIMIT = 60


def background_colour(thumb: np.ndarray) -> np.ndarray:
    """Median RGB of the brightest 10 % of the thumbnail (by R + G + B): the glass of a
    brightfield slide."""
    from stainctl.slide.quantile import brightest_median

    return brightest_median(thumb, 90 / 100)


def colour_warning(thumb: np.ndarray) -> str | None:
    """A warning when the background of a brightfield slide is far from neutral, else None.
    The usual cause: pixels stored as YCbCr while the file says RGB (a known fault of some
    scanners and DICOM converters; the public CMU-1 DICOM conversion has it), which the model
    would turn into a false-colour slide without a word."""
    if background_brightness(thumb) < DARK_P90:
        return None  # fluorescence: a dark background, refused or allowed elsewhere
    colour = background_colour(thumb)
    if colour.max() - colour.min() < TINT_LIMIT or colour.max() < DARK_P90:
        return None
    r, g, b = (int(np.rint(c)) for c in colour)
    return (f"the background is coloured ({r}, {g}, {b}), not near-white or grey glass: the "
            "colours are likely wrong, most often pixels stored as YCbCr in a file whose "
            "header says RGB (a known fault of some scanners and DICOM converters); check the "
            "slide in a viewer and convert it to RGB before trusting the result")


def check_brightfield(thumb: np.ndarray, path: object, allow_dark: bool,
                      hint: str = DARK_HINT, code: str = DARK) -> bool:
    """Return True if the slide is dark (allowed); raise SlideError if dark and not allowed,
    with the caller's `hint` of what to do and failure `code` (the way out differs per
    command: `tile` takes --allow-dark, the main job leaves the slide out)."""
    p90 = background_brightness(thumb)
    if p90 >= DARK_P90:
        return False
    if allow_dark:
        return True
    raise SlideError(path, f"{path}: dark background (90th percentile brightness "
                     f"{p90:.0f}/255): this looks like a fluorescence or dark-field slide, not "
                     f"brightfield H&E/IHC; {hint}", code)


def tissue_mask(thumb: np.ndarray, mpp: float, params: TissueParams,
                dark: bool = False) -> np.ndarray:
    """Boolean mask, same size as `thumb` (at `mpp` µm/px, ideally 4-8)."""
    import cv2

    grey = cv2.medianBlur(cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY), 3)
    if dark:
        # Fluorescence: tissue is what glows above the black background.
        thr, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        mask = grey > max(thr, 10)
    else:
        sat = cv2.medianBlur(cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1], 3)
        from stainctl.slide.quantile import percentile_u8

        glass = percentile_u8(grey, 95)
        mask = (sat > params.saturation) | (grey < glass - params.below_glass)
    m = mask.astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(params.close_um / mpp))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(params.open_um / mpp))
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < params.min_object_um2 / (mpp * mpp))
    small = small[small > 0]  # label 0 is the background
    if small.size:
        m[np.isin(labels, small)] = 0
    return m.astype(bool)


def _disk(diameter_px: float) -> np.ndarray:
    import cv2

    k = max(1, round(diameter_px) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
