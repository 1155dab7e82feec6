"""The tile quality metrics of the CK7 study: blur, stain and background.

Computed with OpenCV reductions on int16/float32/uint8 buffers; `Laplacian(...).var()` in
float64 is 4x slower for the same numbers (docs/NOTES.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SATURATED_LEVEL = 30  # HSV saturation (0-255) above which a pixel counts as stained
WHITE_LEVEL = 235  # mean RGB above which a pixel counts as near-white background


@dataclass(frozen=True)
class FilterThresholds:
    min_laplacian: float = 100.0
    min_saturated: float = 0.10
    max_white: float = 0.60

    def __post_init__(self) -> None:
        from stainctl.errors import UsageError

        if self.min_laplacian < 0:
            raise UsageError(f"--min-laplacian must be 0 or more, got {self.min_laplacian}")
        for flag, value in (("--min-saturated", self.min_saturated),
                            ("--max-white", self.max_white)):
            if not 0 <= value <= 1:
                raise UsageError(f"{flag} is a fraction of the tile, in [0, 1], got {value}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def tile_metrics(rgb: np.ndarray) -> tuple[float, float, float]:
    """(Laplacian variance of the grey image, saturated fraction, near-white fraction)."""
    import cv2

    n = rgb.shape[0] * rgb.shape[1]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # The 3x3 Laplacian of 8-bit grey fits in int16 exactly: a third less work than float32.
    _, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    saturated = cv2.countNonZero(cv2.compare(sat, SATURATED_LEVEL, cv2.CMP_GT)) / n
    # mean(R, G, B) > 235  <=>  R + G + B > 705, summed exactly in float32 (one SIMD pass).
    rgb_sum = cv2.transform(rgb.astype(np.float32), _ONES)
    white = cv2.countNonZero(cv2.compare(rgb_sum, 3 * WHITE_LEVEL, cv2.CMP_GT)) / n
    return float(std[0, 0]) ** 2, saturated, white


_ONES = np.ones((1, 3), np.float32)
