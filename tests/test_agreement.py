"""Agreement statistics (weighted F1 with a bootstrap CI, recall, Pearson/Spearman, Bland-Altman)
checked against scipy and by-hand computations, and `evaluate --readout` on two readout CSVs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from stainctl.evaluate.agreement import class_agreement, value_agreement


def _labels(n=240, seed=1):
    rng = np.random.default_rng(seed)
    truth = rng.choice(["low", "mid", "high"], size=n, p=[0.5, 0.3, 0.2])
    pred = truth.copy()
    flip = rng.random(n) < 0.3
    pred[flip] = rng.choice(["low", "mid", "high"], size=int(flip.sum()))
    return list(truth), list(pred)


def _f1_by_hand(truth, pred):
    total = 0.0
    for c in set(truth):
        tp = sum(t == c and p == c for t, p in zip(truth, pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(truth, pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(truth, pred, strict=True))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        total += f1 * truth.count(c) / len(truth)
    return total


def test_weighted_f1_recall_and_bootstrap_interval():
    truth, pred = _labels()
    got = class_agreement(truth, pred, ["low", "mid", "high"], resamples=2000, seed=3)
    assert got.weighted_f1 == pytest.approx(_f1_by_hand(truth, pred), abs=1e-12)
    assert 0.5 < got.weighted_f1 < 0.95  # the flips bite, but not completely
    for c in ("low", "mid", "high"):
        rows = [i for i, t in enumerate(truth) if t == c]
        assert got.recall[c] == pytest.approx(sum(pred[i] == c for i in rows) / len(rows))
        assert got.support[c] == len(rows)
    assert got.accuracy == pytest.approx(np.mean(np.array(truth) == np.array(pred)))
    # The percentile bootstrap over cases, as scipy computes it (another random stream: the
    # bounds agree to the resampling noise).
    codes = {"low": 0, "mid": 1, "high": 2}
    t = np.array([codes[v] for v in truth])
    p = np.array([codes[v] for v in pred])
    ref = stats.bootstrap((t, p), lambda a, b: _f1_by_hand(list(a), list(b)), paired=True,
                          vectorized=False, method="percentile", n_resamples=2000,
                          confidence_level=0.95, rng=np.random.default_rng(5))
    lo, hi = got.f1_ci
    assert lo < got.weighted_f1 < hi
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.02)
    # Perfect agreement: F1 1 with a degenerate interval; a class missing from the reference
    # has no recall.
    perfect = class_agreement(["a", "b", "a"], ["a", "b", "a"], ["a", "b", "c"])
    assert perfect.weighted_f1 == 1.0 and perfect.f1_ci == (1.0, 1.0)
    assert math.isnan(perfect.recall["c"])


def test_correlations_and_bland_altman_match_scipy():
    rng = np.random.default_rng(7)
    a = np.round(rng.uniform(0, 60, 50), 0)  # rounded: ties, which Spearman ranks by mean rank
    b = a * 0.9 + 4 + rng.normal(0, 5, 50)
    got = value_agreement(a, b)
    assert got.n == 50
    assert got.pearson == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert got.spearman == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    d = b - a
    sd = stats.tstd(d)  # n - 1 in the denominator
    z = stats.norm.ppf(0.975)
    assert got.bias == pytest.approx(d.mean())
    assert got.loa[0] == pytest.approx(d.mean() - z * sd)
    assert got.loa[1] == pytest.approx(d.mean() + z * sd)
    with_gap = value_agreement([1.0, 2.0, math.nan, 4.0], [1.5, 2.5, 3.0, 4.5])
    assert with_gap.n == 3 and with_gap.bias == pytest.approx(0.5)


def _write(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_evaluate_compares_two_readout_csvs(cli, tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    index_a = rng.uniform(0, 50, n)
    index_b = index_a + rng.normal(2, 3, n)
    cls_a = np.where(index_a > 20, "high", "low")
    cls_b = np.where(index_b > 20, "high", "low")
    a, b = tmp_path / "virtual.csv", tmp_path / "real.csv"
    _write(a, ["slide", "path", "ki67_index_pct", "class"],
           [[f"s{i}", f"/x/s{i}.svs", index_a[i], cls_a[i]] for i in range(n)])
    _write(b, ["slide", "ki67_index_pct", "class", "extra"],
           [[f"s{i}", index_b[i], cls_b[i], 1] for i in range(n)] + [["other", 1, "low", 1]])
    r = cli("evaluate", "--readout", a, "--readout", b, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["slides"] == n and data["only_in_b"] == ["other"]
    v = data["values"]["ki67_index_pct"]
    assert v["pearson_r"] == pytest.approx(stats.pearsonr(index_a, index_b).statistic, abs=1e-9)
    assert v["bland_altman_bias"] == pytest.approx((index_b - index_a).mean(), abs=1e-9)
    c = data["classes"]["class"]
    assert c["weighted_f1"] == pytest.approx(_f1_by_hand(list(cls_a), list(cls_b)))
    assert set(data["values"]) | set(data["classes"]) == {"ki67_index_pct", "class"}
    human = cli("evaluate", "--readout", a, "--readout", b)
    assert "Bland-Altman" not in human.stdout and "bias (B-A)" in human.stdout
    assert "weighted F1" in human.stdout

    one = cli("evaluate", "--readout", a)
    assert one.exit_code == 2 and "exactly two" in one.output
    bad = tmp_path / "bad.csv"
    _write(bad, ["name", "x"], [["s1", 1]])
    r = cli("evaluate", "--readout", a, "--readout", bad)
    assert r.exit_code == 2 and "'slide' column" in r.output
    r = cli("evaluate")
    assert r.exit_code == 2 and "--real and --fake" in r.output
