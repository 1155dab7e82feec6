"""DAB-positive area and p90 over every tile of two sets, with percentile bootstrap intervals
(`evaluate.dab_tiles`, `evaluate.bootstrap`), on the real held-out Ki67 crops and CMU-1."""

from __future__ import annotations

import numpy as np
import pytest

from stainctl.engines.fast.data import held_out_crops, hold_out, load_image, tissue_origins
from stainctl.evaluate.agreement import class_agreement
from stainctl.evaluate.bootstrap import (
    Estimate,
    bootstrap_mean,
    bootstrap_mean_ratio,
    bootstrap_pooled,
    resample_indices,
)
from stainctl.evaluate.dab_tiles import compare_dab, dab_set
from stainctl.evaluate.stain import dab_stats


@pytest.fixture(scope="module")
def held_out(ki67_ome_paths) -> list[np.ndarray]:
    """The demo card's held-out crops: the right-hand strips of both Ki67 images (--hold-out
    0.25, 256-px crops at 0.5 µm/px)."""
    crops: list[np.ndarray] = []
    for p in ki67_ome_paths:
        strip = hold_out(load_image(p, 0.5, 0.5), 0.25, 256)[1]
        assert strip is not None
        crops += held_out_crops(strip, 256)
    return crops


@pytest.fixture(scope="module")
def cmu1_tiles(cmu1_path) -> list[np.ndarray]:
    he = load_image(cmu1_path, 0.5)
    return [he[y:y + 256, x:x + 256] for y, x in tissue_origins(he, 256)]


def test_every_tile_is_measured_and_the_interval_holds_the_value(held_out, cmu1_tiles):
    assert len(held_out) == 5 and len(cmu1_tiles) > 20  # as the demo card states
    c = compare_dab(held_out, cmu1_tiles)
    assert (c.real.tiles, c.fake.tiles) == (len(held_out), len(cmu1_tiles))
    # Every tile's own statistics, in order; the means are over all of them.
    assert c.fake.positive == tuple(dab_stats(t).positive for t in cmu1_tiles)
    assert c.real.p90 == tuple(dab_stats(t).p90 for t in held_out)
    assert c.fake.positive_mean.value == pytest.approx(np.mean(c.fake.positive))
    assert c.real.p90_mean.value == pytest.approx(np.mean(c.real.p90))
    for e in (c.real.positive_mean, c.real.p90_mean, c.fake.positive_mean, c.fake.p90_mean,
              c.positive_ratio, c.p90_ratio):
        assert e.low <= e.value <= e.high
    assert c.positive_ratio.value == pytest.approx(c.fake.positive_mean.value
                                                   / c.real.positive_mean.value)
    # The real IHC is brown, the H&E is not: DAB-positive area far below the IHC's. With 5 real
    # crops (2 strongly stained, 3 from the faint scanner) the ratio's interval is much wider
    # than the 30-odd H&E tiles' own interval, and reaches past 1.
    assert c.positive_ratio.value < 0.2 < c.positive_ratio.high
    ratio_width = c.positive_ratio.high / c.positive_ratio.low
    assert ratio_width > c.fake.positive_mean.high / c.fake.positive_mean.low
    d = c.as_dict()
    assert d["fake"]["tiles"] == len(cmu1_tiles) and len(d["dab_positive_ratio"]["ci95"]) == 2


def test_the_figure_does_not_depend_on_tile_order_or_a_sample(held_out, cmu1_tiles):
    a = dab_set(cmu1_tiles)
    b = dab_set(cmu1_tiles[::-1])
    assert a.positive_mean.value == pytest.approx(b.positive_mean.value)
    assert dab_set(cmu1_tiles, seed=1).positive_mean.value == a.positive_mean.value
    # A tile left out changes the figure and its count: nothing is sampled.
    assert dab_set(cmu1_tiles[1:]).tiles == a.tiles - 1


def test_tissue_origins_are_where_held_out_crops_come_from(cmu1_path):
    he = load_image(cmu1_path, 0.5)
    origins = tissue_origins(he, 256)
    crops = held_out_crops(he, 256)
    assert len(origins) == len(crops) > 0
    assert all(np.array_equal(he[y:y + 256, x:x + 256], c)
               for (y, x), c in zip(origins, crops, strict=True))
    assert all(y % 256 == 0 and x % 256 == 0 for y, x in origins)


def test_bootstrap_numbers():
    rng = np.random.default_rng(5)
    v = rng.exponential(size=40)
    e = bootstrap_mean(v, resamples=2000, seed=0)
    assert e.value == pytest.approx(v.mean()) and e.n == 40
    # Close to the normal-theory interval of a mean.
    se = v.std(ddof=1) / np.sqrt(len(v))
    assert e.low == pytest.approx(v.mean() - 1.96 * se, abs=0.6 * se)
    assert e.high == pytest.approx(v.mean() + 1.96 * se, abs=0.6 * se)
    assert bootstrap_mean(v, seed=0) == bootstrap_mean(v, seed=0)  # seeded
    # A constant set has no spread.
    flat = bootstrap_mean([0.2] * 5)
    assert flat.low == pytest.approx(0.2) and flat.high == pytest.approx(0.2)
    # Pooled: sums over cases, cases resampled whole.
    p = bootstrap_pooled([1.0, 3.0, 0.0], [2, 2, 4])
    assert p.value == pytest.approx(0.5) and 0 <= p.low <= p.value <= p.high <= 1.5
    with pytest.raises(ValueError, match="one numerator"):
        bootstrap_pooled([1.0], [1, 2])
    # A ratio of independent sets: resampled apart, so both spreads widen it.
    r = bootstrap_mean_ratio([2.0, 2.2, 1.8], [1.0, 0.5, 1.5])
    assert r.value == pytest.approx(2.0) and r.low < 2.0 < r.high and r.n == 3
    assert np.isnan(bootstrap_mean_ratio([1.0], [0.0]).value)


def test_estimate_validates_itself():
    with pytest.raises(ValueError, match="reversed"):
        Estimate(value=1.0, low=2.0, high=0.5, n=3)
    with pytest.raises(ValueError, match="at least one case"):
        Estimate(value=1.0, low=1.0, high=1.0, n=0)
    with pytest.raises(ValueError, match="no cases"):
        resample_indices(0)
    with pytest.raises(ValueError, match="no tiles"):
        dab_set([])


def test_class_agreement_keeps_its_interval():
    # The shared resampling draws what class_agreement drew before (default_rng(seed).integers).
    truth = ["a", "b", "a", "a", "b", "c", "c", "a"]
    pred = ["a", "b", "b", "a", "b", "c", "a", "a"]
    idx = np.random.default_rng(0).integers(0, len(truth), size=(1000, len(truth)))
    assert np.array_equal(resample_indices(len(truth), 1000, 0), idx)
    ci = class_agreement(truth, pred).f1_ci
    assert ci[0] <= class_agreement(truth, pred).weighted_f1 <= ci[1]
