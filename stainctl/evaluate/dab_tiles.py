"""DAB-positive area and p90 DAB of two whole tile sets, with bootstrap intervals over tiles.

`evaluate --metrics stain` compares equally many images of each set (a seeded sample of the
larger one), which suits FID and the histogram distances but makes a small real set decide how
few output tiles are seen: 4 or 5 of ~22, a sample that moves the output's DAB-positive area
more than training does. This measures every tile of both sets instead, with the per-image
statistics of `stainctl.evaluate.stain.dab_stats` (the project's one DAB definition), and gives
each mean and the output/real ratios a percentile bootstrap 95 % interval over tiles, so a
figure shows how far a handful of real crops can be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stainctl.evaluate.bootstrap import (
    BOOTSTRAP,
    Estimate,
    bootstrap_mean,
    bootstrap_mean_ratio,
)
from stainctl.evaluate.stain import DEFAULT_POSITIVE, dab_stats


@dataclass(frozen=True, kw_only=True)
class DabSet:
    """Per-tile DAB-positive fraction and p90 DAB of every tile of one set, and their means."""

    positive: tuple[float, ...]
    p90: tuple[float, ...]
    positive_mean: Estimate
    p90_mean: Estimate

    def __post_init__(self) -> None:
        if len(self.positive) != len(self.p90) or not self.positive:
            raise ValueError("one positive fraction and one p90 per tile, at least one tile")

    @property
    def tiles(self) -> int:
        return len(self.positive)

    def as_dict(self) -> dict[str, Any]:
        return {"tiles": self.tiles, "dab_positive": self.positive_mean.as_dict(),
                "dab_p90": self.p90_mean.as_dict()}


@dataclass(frozen=True, kw_only=True)
class DabComparison:
    real: DabSet
    fake: DabSet
    positive_ratio: Estimate  # mean positive fraction, fake / real
    p90_ratio: Estimate

    def as_dict(self) -> dict[str, Any]:
        return {"real": self.real.as_dict(), "fake": self.fake.as_dict(),
                "dab_positive_ratio": self.positive_ratio.as_dict(3),
                "dab_p90_ratio": self.p90_ratio.as_dict(3)}


def dab_set(tiles: Sequence[np.ndarray], *, threshold: float = DEFAULT_POSITIVE,
            resamples: int = BOOTSTRAP, seed: int = 0) -> DabSet:
    """Every tile of a set (RGB uint8, any sizes) measured; the means' intervals."""
    if not tiles:
        raise ValueError("no tiles to measure")
    stats = [dab_stats(t, threshold) for t in tiles]
    positive = tuple(s.positive for s in stats)
    p90 = tuple(s.p90 for s in stats)
    return DabSet(positive=positive, p90=p90,
                  positive_mean=bootstrap_mean(positive, resamples=resamples, seed=seed),
                  p90_mean=bootstrap_mean(p90, resamples=resamples, seed=seed))


def compare_dab(real: Sequence[np.ndarray], fake: Sequence[np.ndarray], *,
                threshold: float = DEFAULT_POSITIVE, resamples: int = BOOTSTRAP,
                seed: int = 0) -> DabComparison:
    """Every real tile against every fake tile; ratios resample the two sets independently."""
    r = dab_set(real, threshold=threshold, resamples=resamples, seed=seed)
    f = dab_set(fake, threshold=threshold, resamples=resamples, seed=seed)
    return DabComparison(
        real=r, fake=f,
        positive_ratio=bootstrap_mean_ratio(f.positive, r.positive, resamples=resamples,
                                            seed=seed),
        p90_ratio=bootstrap_mean_ratio(f.p90, r.p90, resamples=resamples, seed=seed))
