"""Percentile bootstrap 95 % intervals over cases (tiles, slides, readout cases).

One resampling rule for every interval `evaluate` reports: `resamples` draws of n cases with
replacement from a generator seeded with `seed`, and the 2.5th and 97.5th percentiles of the
statistic over the draws. Two sets measured independently (a model's output and the real IHC)
are resampled independently, each from its own seeded stream, so the interval of their ratio
carries the uncertainty of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP = 1000  # resamples for a 95 % interval

Values = Sequence[float] | np.ndarray


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """A value, its percentile bootstrap 95 % interval, and how many cases it came from
    (for a ratio of two sets: the smaller set)."""

    value: float
    low: float
    high: float
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"an estimate needs at least one case, got {self.n}")
        if self.low > self.high:  # nan (no defined draw) passes: it is reported as such
            raise ValueError(f"interval ({self.low}, {self.high}) is reversed")

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        return {"value": round(self.value, digits),
                "ci95": [round(self.low, digits), round(self.high, digits)], "n": self.n}


def resample_indices(n: int, resamples: int = BOOTSTRAP,
                     seed: int | Sequence[int] = 0) -> np.ndarray:
    """(resamples, n) indices of n cases drawn with replacement."""
    if n < 1:
        raise ValueError("nothing to resample: no cases")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _estimate(value: float, n: int, boot: np.ndarray) -> Estimate:
    finite = boot[np.isfinite(boot)]  # draws with an undefined statistic (0 / 0) left out
    if finite.size == 0:
        return Estimate(value=value, low=float("nan"), high=float("nan"), n=n)
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return Estimate(value=value, low=float(lo), high=float(hi), n=n)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per draw, nan where den is not positive."""
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _scalar_ratio(num: float, den: float) -> float:
    """`_ratio` of one value."""
    return float(num / den) if den > 0 else float("nan")


def bootstrap_mean(values: Values, *, resamples: int = BOOTSTRAP, seed: int = 0) -> Estimate:
    """The mean of per-case values."""
    v = np.asarray(values, np.float64)
    boot = v[resample_indices(len(v), resamples, seed)].mean(axis=1)
    return _estimate(float(v.mean()), len(v), boot)


def bootstrap_pooled(num: Values, den: Values, *, resamples: int = BOOTSTRAP,
                     seed: int = 0) -> Estimate:
    """sum(num) / sum(den) over cases, a pooled quantity (e.g. a density summed over each
    tile's pixels of a kind, over their count), the cases resampled whole."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"one numerator and one denominator per case: {a.shape} vs {b.shape}")
    idx = resample_indices(len(a), resamples, seed)
    value = _scalar_ratio(a.sum(), b.sum())
    return _estimate(value, len(a), _ratio(a[idx].sum(axis=1), b[idx].sum(axis=1)))


def bootstrap_mean_ratio(fake: Values, real: Values, *, resamples: int = BOOTSTRAP,
                         seed: int = 0) -> Estimate:
    """mean(fake) / mean(real) of two independent sets of cases, each resampled on its own."""
    f, r = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    mf = f[resample_indices(len(f), resamples, [seed, 0])].mean(axis=1)
    mr = r[resample_indices(len(r), resamples, [seed, 1])].mean(axis=1)
    value = _scalar_ratio(f.mean(), r.mean())
    return _estimate(value, min(len(f), len(r)), _ratio(mf, mr))
