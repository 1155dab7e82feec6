"""Agreement between two readouts of the same slides, or between predicted and true classes.

  * classes: weighted F1 (per-class F1 weighted by the class's support in the reference, as
    HistoStainAlign reports it) with a percentile bootstrap 95 % interval over cases, per-class
    recall, accuracy;
  * continuous values (a Ki67 index, an H-score): Pearson and Spearman r, and Bland-Altman bias
    (mean of B - A) with its 95 % limits of agreement (bias +- 1.96 SD of the differences).
Plain numpy; the test checks every number against scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stainctl.evaluate.bootstrap import BOOTSTRAP, resample_indices

Z95 = 1.959963984540054  # the normal 97.5 % quantile: Bland-Altman's limits


@dataclass(frozen=True, kw_only=True)
class ClassAgreement:
    n: int
    accuracy: float
    weighted_f1: float
    f1_ci: tuple[float, float]  # percentile bootstrap 95 % interval
    recall: dict[str, float]  # per class of the reference (nan: class absent from it)
    support: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "weighted_f1": self.weighted_f1,
                "weighted_f1_ci95": list(self.f1_ci), "recall": self.recall,
                "support": self.support}


@dataclass(frozen=True, kw_only=True)
class ValueAgreement:
    """None where a figure cannot be had from `n` cases (`missing` says why): a bias from one
    case, limits of agreement (an SD) from two, a correlation from three."""

    n: int
    pearson: float | None
    spearman: float | None
    bias: float | None  # mean of (b - a)
    mean_abs: float | None  # mean of |b - a|
    loa: tuple[float, float] | None  # bias -+ 1.96 SD of (b - a), SD with n - 1
    missing: str | None = None

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if (self.pearson is None or self.loa is None or self.bias is None) and not self.missing:
            raise ValueError("a figure left out needs its reason (missing)")

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "pearson_r": self.pearson, "spearman_r": self.spearman,
                "bland_altman_bias": self.bias, "mean_abs_difference": self.mean_abs,
                "bland_altman_loa95": list(self.loa) if self.loa is not None else None,
                "missing": self.missing}


def _codes(truth: Sequence[Any], pred: Sequence[Any],
           classes: Sequence[Any] | None) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    names = list(classes) if classes is not None else sorted(
        {*map(str, truth), *map(str, pred)})
    index = {str(c): i for i, c in enumerate(names)}
    try:
        t = np.array([index[str(v)] for v in truth], np.int64)
        p = np.array([index[str(v)] for v in pred], np.int64)
    except KeyError as err:
        raise ValueError(f"class {err} is not one of {names}") from None
    return t, p, names


def _weighted_f1(t: np.ndarray, p: np.ndarray, k: int) -> float:
    """Weighted F1 of integer labels (rows of t and p may be batches: (..., n))."""
    t2, p2 = np.atleast_2d(t), np.atleast_2d(p)
    n = t2.shape[1]
    out = np.zeros(t2.shape[0])
    for c in range(k):
        tc, pc = t2 == c, p2 == c
        tp = (tc & pc).sum(axis=1)
        support = tc.sum(axis=1)
        denom = support + pc.sum(axis=1)
        f1 = np.divide(2 * tp, denom, out=np.zeros(len(out)), where=denom > 0)
        out += f1 * support / n
    return out if t.ndim > 1 else float(out[0])  # type: ignore[return-value]


def class_agreement(truth: Sequence[Any], pred: Sequence[Any],
                    classes: Sequence[Any] | None = None, *, resamples: int = BOOTSTRAP,
                    seed: int = 0) -> ClassAgreement:
    """`pred` against the reference `truth` (class names or numbers)."""
    t, p, names = _codes(truth, pred, classes)
    n, k = len(t), len(names)
    if n == 0 or len(p) != n:
        raise ValueError(f"need two equally long, non-empty label lists (got {n} and {len(p)})")
    f1 = _weighted_f1(t, p, k)
    idx = resample_indices(n, resamples, seed)
    boot = np.asarray(_weighted_f1(t[idx], p[idx], k))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    recall, support = {}, {}
    for c, name in enumerate(names):
        m = t == c
        support[str(name)] = int(m.sum())
        recall[str(name)] = float((p[m] == c).mean()) if m.any() else float("nan")
    return ClassAgreement(n=n, accuracy=float((t == p).mean()), weighted_f1=float(f1),
                          f1_ci=(float(lo), float(hi)), recall=recall, support=support)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank (as Spearman's r needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / denom) if denom > 0 else None


def value_agreement(a: Sequence[float], b: Sequence[float]) -> ValueAgreement:
    """Two readouts of the same cases: correlation, and Bland-Altman's bias (b - a) and limits.
    Cases where either value is missing (nan) are left out. Each figure is given from as few
    cases as it can be had from (bias 1, limits 2, correlation 3), else None with the reason."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"need two equally long value lists (got {len(x)} and {len(y)})")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n == 0:
        return ValueAgreement(n=0, pearson=None, spearman=None, bias=None, mean_abs=None,
                              loa=None, missing="no slide has a value in both readouts")
    d = y - x
    bias = float(d.mean())
    loa = None
    if n >= 2:
        sd = float(d.std(ddof=1))
        loa = (bias - Z95 * sd, bias + Z95 * sd)
    pearson = spearman = None
    missing = None
    if n < 3:
        missing = (f"correlation needs at least 3 slides with a value in both (n={n})"
                   + ("; limits of agreement at least 2" if n < 2 else ""))
    else:
        pearson, spearman = _pearson(x, y), _pearson(_rank(x), _rank(y))
        if pearson is None:
            missing = "no correlation: one readout has the same value for every slide"
    return ValueAgreement(n=n, pearson=pearson, spearman=spearman, bias=bias,
                          mean_abs=float(np.abs(d).mean()), loa=loa, missing=missing)
