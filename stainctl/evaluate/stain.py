"""DAB stain metrics as UNIStainNet defines them, from colour deconvolution.

The DAB channel is the optical density that scikit-image's `rgb2hed` assigns to DAB with the
standard H-DAB stain vectors (Ruifrok & Johnston), computed by `stainctl.stain.deconvolution`,
the same definition the trainer's DAB loss uses. Per image we keep its p90 score (the mean of
its top 10 % DAB values), a fixed-bin DAB histogram and the DAB-positive area fraction; the set
metrics compare those across paired or unpaired images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stainctl.stain.deconvolution import dab_density as dab_channel

# DAB optical densities above this are rare even on strong stains (the skimage IHC image: p99
# 0.19); the last bin collects them.
HIST_RANGE = (0.0, 0.3)
HIST_BINS = 64
DEFAULT_POSITIVE = 0.15  # "clearly brown", as in the demo model card


@dataclass(frozen=True)
class DabStats:
    p90: float  # mean of the top 10 % of DAB values
    positive: float  # fraction of pixels with DAB above the threshold
    hist: np.ndarray  # (HIST_BINS,) pixel counts


def dab_stats(rgb: np.ndarray, positive_threshold: float = DEFAULT_POSITIVE) -> DabStats:
    dab = dab_channel(rgb).ravel()
    k = max(1, dab.size // 10)
    top = np.partition(dab, dab.size - k)[dab.size - k:]
    # Equal-width bins over HIST_RANGE, values beyond it in the end bins (np.histogram's
    # result on the clipped values, without its sort).
    lo, hi = HIST_RANGE
    idx = ((dab - lo) * (HIST_BINS / (hi - lo))).astype(np.int64)
    hist = np.bincount(np.clip(idx, 0, HIST_BINS - 1), minlength=HIST_BINS)
    return DabStats(float(top.mean(dtype=np.float64)),
                    float(np.count_nonzero(dab > positive_threshold) / dab.size), hist)


def _distribution(hist: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    p = hist.astype(np.float64) + eps
    return p / p.sum()


def histogram_kl(real: np.ndarray, fake: np.ndarray) -> float:
    """KL(real || fake) of two DAB histograms, smoothed so empty bins stay finite."""
    p, q = _distribution(real), _distribution(fake)
    return float(np.sum(p * np.log(p / q)))


def histogram_jsd(real: np.ndarray, fake: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log, so at most ln 2)."""
    p, q = _distribution(real), _distribution(fake)
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))


def paired_stain_metrics(real: Sequence[DabStats], fake: Sequence[DabStats]) -> dict[str, float]:
    """Agreement of paired images' DAB: Pearson r and MAE of the p90 scores, mean histogram
    KL and JSD per pair."""
    a = np.array([s.p90 for s in real])
    b = np.array([s.p90 for s in fake])
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("paired stain metrics need the same, non-zero number of images")
    r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 \
        else float("nan")
    return {
        "pairs": len(a),
        "p90_pearson_r": r,
        "p90_mae": float(np.abs(a - b).mean()),
        "hist_kl": float(np.mean([histogram_kl(x.hist, y.hist) for x, y in zip(real, fake,
                                                                              strict=True)])),
        "hist_jsd": float(np.mean([histogram_jsd(x.hist, y.hist) for x, y in zip(real, fake,
                                                                                strict=True)])),
    }


def unpaired_stain_metrics(real: Sequence[DabStats], fake: Sequence[DabStats]) -> dict[str, float]:
    """Set-level comparison: Wasserstein distance of the DAB-positive fractions and of the p90
    scores, and KL/JSD of the pooled histograms."""
    from scipy.stats import wasserstein_distance

    pos_r = [s.positive for s in real]
    pos_f = [s.positive for s in fake]
    pooled_r = np.sum([s.hist for s in real], axis=0)
    pooled_f = np.sum([s.hist for s in fake], axis=0)
    return {
        "positive_fraction_real": float(np.mean(pos_r)),
        "positive_fraction_fake": float(np.mean(pos_f)),
        "positive_fraction_wasserstein": float(wasserstein_distance(pos_r, pos_f)),
        "p90_real": float(np.mean([s.p90 for s in real])),
        "p90_fake": float(np.mean([s.p90 for s in fake])),
        "p90_wasserstein": float(wasserstein_distance([s.p90 for s in real],
                                                      [s.p90 for s in fake])),
        "pooled_hist_kl": histogram_kl(pooled_r, pooled_f),
        "pooled_hist_jsd": histogram_jsd(pooled_r, pooled_f),
    }
