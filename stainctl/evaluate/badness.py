"""A proxy "badness" per generated tile, to show the best and worst cases of a set.

Three failure signs of generated tiles, measured cheaply: a washed-out stain (little spread of
HSV saturation), repetition (a strong normalised autocorrelation peak away from zero shift, as
tiled or looping textures give) and an extreme Laplacian variance (blur, or noise). Within a
set each is turned into a robust z-score; badness is their sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shifts (px at 256-px analysis size) below this are texture, not repetition.
MIN_SHIFT = 8
ANALYSIS_SIZE = 256


@dataclass(frozen=True)
class TileSigns:
    saturation_spread: float  # std of HSV saturation (0-255)
    repetition: float  # highest normalised autocorrelation at shifts >= MIN_SHIFT
    log_laplacian: float  # log10 of the grey Laplacian variance


def tile_signs(rgb: np.ndarray) -> TileSigns:
    import cv2

    small = cv2.resize(rgb, (ANALYSIS_SIZE, ANALYSIS_SIZE), interpolation=cv2.INTER_AREA)
    sat = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    return TileSigns(float(sat.std()), _repetition(grey), float(np.log10(lap.var() + 1e-6)))


def _repetition(grey: np.ndarray) -> float:
    g = grey - grey.mean()
    power = np.abs(np.fft.rfft2(g)) ** 2
    ac = np.fft.irfft2(power, s=g.shape)
    if ac[0, 0] <= 0:
        return 0.0  # a flat tile has no texture to repeat
    ac = np.fft.fftshift(ac / ac[0, 0])
    h, w = ac.shape
    yy, xx = np.ogrid[:h, :w]
    far = (yy - h // 2) ** 2 + (xx - w // 2) ** 2 >= MIN_SHIFT ** 2
    return float(ac[far].max())


def _robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    mad = np.median(np.abs(values - med)) * 1.4826
    return (values - med) / (mad if mad > 1e-9 else max(float(values.std()), 1e-9))


def badness(signs: list[TileSigns]) -> np.ndarray:
    """Per-tile badness within one set: higher is worse."""
    if not signs:
        return np.zeros(0)
    sat = np.array([s.saturation_spread for s in signs])
    rep = np.array([s.repetition for s in signs])
    lap = np.array([s.log_laplacian for s in signs])
    return -_robust_z(sat) + _robust_z(rep) + np.abs(_robust_z(lap))
