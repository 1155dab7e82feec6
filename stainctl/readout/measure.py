"""What `readout` measures in one tile, and how tile records add up to a slide.

Per tile: tissue area, DAB-positive area, the areas of the H-score's weak / moderate / strong
bins of DAB density, and for nuclear markers the nuclei found and how many are positive. Areas are
in µm² so tiles of any size and slides of any resolution sum and compare; fractions, the H-score
and the index are computed from the sums (a slide's index is its positive nuclei over all its
nuclei, not a mean of tile indices).

Densities are in `rgb2hed` units (decadic optical density / 6), relative to the slide's glass.
Default thresholds are the usual DAB optical densities of QuPath and IHC scoring practice
(decadic 0.2 / 0.4 / 0.6 for 1+ / 2+ / 3+, i.e. 0.033 / 0.067 / 0.1 here), not fitted to the
test slides:
  * positive area: DAB above the weak (1+) threshold;
  * H-score (0-300): 1 x % weak + 2 x % moderate + 3 x % strong of the tissue area, a pixel-wise
    H-score (each bin [low, next low));
  * tissue: any pixel darker than the glass by `tissue_od` in total density (haematoxylin + DAB),
    so pale cytoplasm counts and glass does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np

from stainctl.readout.nuclei import WHITE, NucleiParams


@dataclass(frozen=True, kw_only=True)
class ReadoutParams:
    """DAB thresholds (rgb2hed units) of positive area and the H-score bins; nuclei detection."""

    positive_od: float = 0.033  # DAB-positive pixel (decadic 0.2), = the weak bin's lower bound
    weak_od: float = 0.033  # 1+ from here (decadic 0.2)
    moderate_od: float = 0.067  # 2+ from here (decadic 0.4)
    strong_od: float = 0.1  # 3+ from here (decadic 0.6)
    tissue_od: float = 0.01  # a pixel is tissue when H + DAB exceeds this (decadic 0.06)
    nuclei: NucleiParams = field(default_factory=NucleiParams)

    def __post_init__(self) -> None:
        for name in ("positive_od", "weak_od", "moderate_od", "strong_od", "tissue_od"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ReadoutParams.{name} must be a positive number, not {value!r}")
        if not self.weak_od < self.moderate_od < self.strong_od:
            raise ValueError("ReadoutParams: the H-score thresholds must rise, weak < moderate < "
                             f"strong ({self.weak_od}, {self.moderate_od}, {self.strong_od})")
        if not isinstance(self.nuclei, NucleiParams):
            raise ValueError("ReadoutParams.nuclei must be NucleiParams")


@dataclass(frozen=True, kw_only=True)
class TileReadout:
    """One tile's (or, summed, one slide's) measurements. Areas in µm²; nuclei counts are None
    when nuclei were not looked for (a membrane or cytoplasmic marker)."""

    tissue_um2: float
    positive_um2: float
    weak_um2: float
    moderate_um2: float
    strong_um2: float
    nuclei: int | None = None
    positive_nuclei: int | None = None

    def __post_init__(self) -> None:
        for name in ("tissue_um2", "positive_um2", "weak_um2", "moderate_um2", "strong_um2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TileReadout.{name} must be a non-negative area, not {value!r}")
        if (self.nuclei is None) != (self.positive_nuclei is None):
            raise ValueError("TileReadout: nuclei and positive_nuclei are both given or neither")
        if self.nuclei is not None and not 0 <= (self.positive_nuclei or 0) <= self.nuclei:
            raise ValueError("TileReadout: positive_nuclei must be between 0 and nuclei "
                             f"({self.positive_nuclei} of {self.nuclei})")

    @property
    def positive_fraction(self) -> float:
        """DAB-positive area over tissue area, 0-1 (0 without tissue)."""
        return self.positive_um2 / self.tissue_um2 if self.tissue_um2 > 0 else 0.0

    @property
    def h_score(self) -> float:
        """0-300: 1 x % weak + 2 x % moderate + 3 x % strong of the tissue area."""
        if self.tissue_um2 <= 0:
            return 0.0
        return 100.0 * (self.weak_um2 + 2 * self.moderate_um2 + 3 * self.strong_um2) \
            / self.tissue_um2

    @property
    def index(self) -> float | None:
        """Positive nuclei over all nuclei, 0-1; None when nuclei were not counted or none
        were found."""
        if self.nuclei is None or self.positive_nuclei is None or self.nuclei == 0:
            return None
        return self.positive_nuclei / self.nuclei

    @property
    def nuclei_per_mm2(self) -> float | None:
        if self.nuclei is None or self.tissue_um2 <= 0:
            return None
        return self.nuclei / (self.tissue_um2 / 1e6)

    def __add__(self, other: TileReadout) -> TileReadout:
        return sum_readouts([self, other])


def sum_readouts(records: Iterable[TileReadout], *, nuclear: bool | None = None) -> TileReadout:
    """The slide record of its tile records: areas and counts summed. Nuclei are counted when
    every record counted them (or `nuclear` says so for an empty list)."""
    records = list(records)
    areas = {f.name: 0.0 for f in fields(TileReadout) if f.name.endswith("_um2")}
    for r in records:
        for name in areas:
            areas[name] += getattr(r, name)
    counted = all(r.nuclei is not None for r in records) if records else bool(nuclear)
    nuclei = sum(r.nuclei or 0 for r in records) if counted else None
    positive = sum(r.positive_nuclei or 0 for r in records) if counted else None
    return TileReadout(tissue_um2=areas["tissue_um2"], positive_um2=areas["positive_um2"],
                       weak_um2=areas["weak_um2"], moderate_um2=areas["moderate_um2"],
                       strong_um2=areas["strong_um2"], nuclei=nuclei, positive_nuclei=positive)


def measure_tile(rgb: np.ndarray, mpp: float, params: ReadoutParams | None = None,
                 nuclear: bool = False, *, white: tuple[int, int, int] = WHITE,
                 valid: np.ndarray | None = None,
                 tissue: np.ndarray | None = None) -> TileReadout:
    """Measure a uint8 RGB(A) tile at `mpp` µm/px. `white` is the slide's glass colour;
    `valid` (H, W) bool, when given, limits the areas to those pixels (a tile's part inside the
    slide) and nuclei to those whose centre lies in them. `tissue` (H, W) bool, when given, is
    the tissue (the slide's tissue mask) instead of the pixel rule of `tissue_od`: pale cytoplasm
    is near glass on some scanners, so the mask's area is the one that compares across them."""
    import cv2

    from stainctl.readout.nuclei import _check_input, densities, detect_nuclei

    params = params or ReadoutParams()
    _check_input(rgb, mpp)
    haematoxylin, dab = densities(rgb, white)
    # Masks as uint8 and counts by OpenCV (outside the GIL, no bool temporaries): this runs on
    # every tile of a slide, next to a tile read that costs about as much.
    if tissue is None:
        mask = cv2.compare(cv2.add(haematoxylin, dab), params.tissue_od, cv2.CMP_GT)
    else:
        mask = np.ascontiguousarray(tissue, dtype=bool).view(np.uint8)
    if valid is not None:
        mask = cv2.bitwise_and(mask, np.ascontiguousarray(valid, dtype=bool).view(np.uint8))
    px = mpp * mpp

    def at_least(od: float) -> int:
        """Tissue pixels with DAB density >= od."""
        return cv2.countNonZero(cv2.bitwise_and(cv2.compare(dab, od, cv2.CMP_GE), mask))

    weak, moderate, strong = (at_least(params.weak_od), at_least(params.moderate_od),
                              at_least(params.strong_od))
    positive = weak if params.positive_od == params.weak_od else at_least(params.positive_od)
    tissue_um2 = float(cv2.countNonZero(mask)) * px

    def record(nuclei: int | None = None, positive_nuclei: int | None = None) -> TileReadout:
        # The bins are [weak, moderate), [moderate, strong), [strong, inf): thresholds rise.
        return TileReadout(tissue_um2=tissue_um2, positive_um2=positive * px,
                           weak_um2=(weak - moderate) * px, moderate_um2=(moderate - strong) * px,
                           strong_um2=strong * px, nuclei=nuclei,
                           positive_nuclei=positive_nuclei)

    if not nuclear:
        return record()
    found = detect_nuclei(rgb, mpp, params.nuclei, white=white, dab=dab,
                          haematoxylin=haematoxylin)
    keep = np.ones(found.count, dtype=bool)
    if valid is not None and found.count:
        cx = np.clip(np.round(found.centroid_xy[:, 0]).astype(int), 0, rgb.shape[1] - 1)
        cy = np.clip(np.round(found.centroid_xy[:, 1]).astype(int), 0, rgb.shape[0] - 1)
        keep = valid[cy, cx]
    return record(int(keep.sum()), int((found.positive & keep).sum()))
