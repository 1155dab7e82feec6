"""Tissue detection and grid geometry on real slides, against independent computations."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from conftest import OME_HE, OME_KI67

from stainctl.errors import SlideError
from stainctl.slide import open_slide
from stainctl.slide.grid import GridParams, make_grid
from stainctl.slide.thumbnail import read_thumbnail, thumbnail_mpp
from stainctl.slide.tissue import TissueParams, check_brightfield, tissue_mask


def _mask(path):
    s = open_slide(path)
    mpp = thumbnail_mpp(s.mpp, *s.dimensions)
    thumb = read_thumbnail(s, mpp)
    return thumb, tissue_mask(thumb, mpp, TissueParams())


def test_thumbnail_matches_a_direct_downsample(cmu1_path):
    s = open_slide(cmu1_path)
    mpp = thumbnail_mpp(s.mpp, *s.dimensions)
    thumb = read_thumbnail(s, mpp)
    full = s.read_region(0, 0, 0, *s.dimensions)
    ref = cv2.resize(full, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_AREA)
    assert thumb.shape[1] == round(s.dimensions[0] * s.mpp / mpp)
    assert np.abs(thumb.astype(int) - ref).mean() < 1.0


def test_thumbnail_in_strips_equals_one_piece(monkeypatch, cmu1_path):
    import stainctl.slide.thumbnail as th

    s = open_slide(cmu1_path)
    whole = th.read_thumbnail(s, 4.0)
    monkeypatch.setattr(th, "STRIP_PIXELS", 50_000)  # force many strips
    strips = th.read_thumbnail(s, 4.0)
    assert np.abs(strips.astype(int) - whole).mean() < 1.5


def test_cmu1_tissue_is_the_stained_region(cmu1_path):
    thumb, mask = _mask(cmu1_path)
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1]
    # Tissue pixels are stained; glass is not. The mask must separate them clearly.
    assert 0.25 < mask.mean() < 0.55
    assert np.median(sat[mask]) > 40 and np.median(sat[~mask]) < 10


@pytest.mark.parametrize("path", [OME_HE, *OME_KI67], ids=lambda p: p.name)
def test_pale_ihc_and_dense_he_crops_are_mostly_tissue(path):
    _, mask = _mask(path)
    assert mask.mean() > 0.6  # these crops are tissue with a few lumens


def test_fluorescence_is_refused_unless_allowed(dapi_path, cmu1_path):
    s = open_slide(dapi_path)
    thumb = read_thumbnail(s, 8.0)
    with pytest.raises(SlideError, match="--allow-dark"):
        check_brightfield(thumb, dapi_path, allow_dark=False)
    assert check_brightfield(thumb, dapi_path, allow_dark=True) is True
    h_e = read_thumbnail(open_slide(cmu1_path), 8.0)
    assert check_brightfield(h_e, cmu1_path, allow_dark=False) is False


@pytest.mark.parametrize("width,mpp,target,size,overlap", [
    (2220, 0.499, 0.5, 512, 0), (2220, 0.499, 0.5, 512, 64), (1101, 0.2271, 0.5, 256, 0),
    (1000, 0.25, 1.0, 250, 0),  # exactly one tile
])
def test_grid_covers_the_slide_with_no_gap(width, mpp, target, size, overlap):
    g = make_grid(width, width, mpp, GridParams(target, size, overlap))
    assert g.extent0 == pytest.approx(size * target / mpp)
    assert g.stride0 == pytest.approx((size - overlap) * target / mpp)
    xs, _ = g.origins()
    last = xs.max()
    assert last + g.extent0 >= width  # covers the right edge
    assert last < width  # and no tile lies wholly outside
    expected = 1 + max(0, math.ceil((width - g.extent0) / g.stride0))
    assert g.cols == expected


def test_tissue_fractions_of_a_shifted_grid_are_those_of_its_own_footprints(cmu1_path):
    from stainctl.slide.grid import tissue_fractions

    _, mask = _mask(cmu1_path)
    s = open_slide(cmu1_path)
    w0, h0 = s.dimensions
    grid = make_grid(w0, h0, s.mpp, GridParams(0.5, 256, 0, 0.5))
    shift = round(grid.extent0 / 2)
    moved = tissue_fractions(mask, w0, h0, grid, offset=shift)
    # Independently: the mask area under each moved footprint, in thumbnail pixels.
    sx, sy = mask.shape[1] / w0, mask.shape[0] / h0
    xs, ys = grid.origins()
    for x, y, f in zip(xs + shift, ys + shift, moved, strict=True):
        x0, x1 = round(x * sx), round((x + grid.extent0) * sx)
        y0, y1 = round(y * sy), round((y + grid.extent0) * sy)
        assert f == pytest.approx(mask[y0:y1, x0:x1].sum() / ((x1 - x0) * (y1 - y0)))
    assert not np.allclose(moved, tissue_fractions(mask, w0, h0, grid))  # it did move


def test_histogram_quantiles_equal_numpys_to_the_bit(monkeypatch, cmu1_path):
    """The overview stage's quantiles from histograms (no float64 copy of the thumbnail) are
    numpy's, bit for bit: on random integers with ties at every kind of quantile, and on a real
    thumbnail, counted in chunks smaller than it."""
    import stainctl.slide.quantile as qm
    from stainctl.readout.background import BRIGHTEST

    rng = np.random.default_rng(0)
    for trial in range(3000):
        n, top = int(rng.integers(1, 2000)), int(rng.choice([2, 17, 256, 766]))
        x = rng.integers(0, top, n)
        if trial % 2:
            x = np.minimum(x, rng.integers(0, top))  # many ties
        q = float(rng.choice([0.0, 1.0, 0.5, 0.9, 0.95, 1.0 - BRIGHTEST, rng.random()]))
        assert qm.quantile_of_counts(qm.counts(x, top), q) == np.quantile(x, q), (n, top, q)
    thumb, _ = _mask(cmu1_path)
    monkeypatch.setattr(qm, "CHUNK", 1000)  # several chunks
    grey = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY)
    for p in (90, 95, 2.5):
        assert qm.percentile_u8(grey, p) == np.percentile(grey, p)
    rgb = thumb.reshape(-1, 3).astype(np.int32)
    total = rgb.sum(axis=1)
    for q in (0.9, 1.0 - BRIGHTEST):
        want = np.median(rgb[total >= np.quantile(total, q)], axis=0)
        np.testing.assert_array_equal(qm.brightest_median(thumb, q), want)
