"""Quantiles of small-integer images from their histogram, equal to numpy's to the last bit.

`np.percentile` of a uint8 image converts it to float64 and sorts a copy: 16 bytes a pixel of
temporaries, ~50 MB for the thumbnail of a 15 mm slide, the largest part of the overview stage's
peak memory. The histogram holds the same order statistics in a few kB; the interpolation below
repeats numpy's default ('linear') method operation for operation, so results are identical
(tests/test_tissue_grid.py compares them).
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 20  # pixels counted at a time: bincount's int64 copy of them stays ~8 MB


def counts(values: np.ndarray, bins: int) -> np.ndarray:
    """(bins,) int64 histogram of the non-negative integers in `values` (all < bins)."""
    flat = values.reshape(-1)
    total = np.zeros(bins, dtype=np.int64)
    for start in range(0, flat.size, CHUNK):
        total += np.bincount(flat[start:start + CHUNK], minlength=bins)
    return total


def quantile_of_counts(hist: np.ndarray, q: float) -> float:
    """`np.quantile(values, q)` of the values whose histogram is `hist` (hist[v]: how many
    equal v), by numpy's linear method with its float64 operations."""
    n = int(hist.sum())
    if n == 0:
        raise ValueError("quantile of no values")
    cum = np.cumsum(hist)

    def value(rank: int) -> int:  # the value at this 0-based rank of the sorted values
        return int(np.searchsorted(cum, rank, side="right"))

    virtual = np.float64(n - 1) * np.float64(q)
    if virtual >= n - 1:
        return float(value(n - 1))
    if virtual < 0:
        return float(value(0))
    previous = np.floor(virtual)
    gamma = virtual - previous
    a, b = np.int64(value(int(previous))), np.int64(value(int(previous) + 1))
    diff = b - a
    if gamma >= 0.5:
        return float(b - diff * (np.float64(1) - gamma))
    return float(a + diff * gamma)


def percentile_u8(image: np.ndarray, percent: float) -> float:
    """`np.percentile(image, percent)` of a uint8 array."""
    return quantile_of_counts(counts(image, 256), np.true_divide(percent, 100))


def brightest_median(rgb: np.ndarray, q: float) -> np.ndarray:
    """(3,) float64 per-channel median of the pixels of uint8 RGB(A) `rgb` whose R + G + B is
    at least its `q` quantile (the glass, for q near 1): equal to doing it in int32 and numpy,
    without the int32 copy of every pixel."""
    pixels = rgb[..., :3].reshape(-1, 3)
    total = np.add(pixels[:, 0], pixels[:, 1], dtype=np.uint16)
    total += pixels[:, 2]
    cut = quantile_of_counts(counts(total, 3 * 255 + 1), q)
    return np.asarray(np.median(pixels[total >= cut], axis=0), dtype=np.float64)
