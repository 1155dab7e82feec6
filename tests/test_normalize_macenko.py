"""Macenko's fit (torchstain's, with the stain plane through zero density), its inverse, and the
reference read at the tile grid's resolution, on the real CMU-1 sample (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest

from stainctl.normalize import macenko
from stainctl.normalize.sample import load_reference


@pytest.fixture(scope="module")
def cmu1_tissue(cmu1_path) -> np.ndarray:
    px = load_reference(cmu1_path).pixels
    return px[np.random.default_rng(0).choice(len(px), 200_000, replace=False)]


def _off_plane(pixels: np.ndarray, he: np.ndarray) -> float:
    """Mean optical density a pixel loses when rebuilt from its two stain amounts."""
    od = -np.log((pixels.astype(np.float64) + 1) / macenko.IO)
    amounts = np.linalg.lstsq(he, od.T, rcond=None)[0]
    return float(np.linalg.norm(od - (he @ amounts).T, axis=1).mean())


def test_the_fit_is_torchstains_with_only_the_stain_plane_changed(cmu1_tissue):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    norm = NumpyMacenkoNormalizer()
    norm.fit(cmu1_tissue.reshape(-1, 1, 3), Io=macenko.IO)
    he_c, max_c = macenko.fit_macenko(cmu1_tissue, centred=True)
    np.testing.assert_allclose(he_c, norm.HERef, atol=1e-9)
    np.testing.assert_allclose(max_c, norm.maxCRef, atol=1e-9)
    he, _ = macenko.fit_macenko(cmu1_tissue)
    assert np.allclose(np.linalg.norm(he, axis=0), 1)
    assert he[0, 0] > he[0, 1]  # haematoxylin (absorbs more red) first
    # Through zero density the plane holds more of the tissue's density (measured 0.086 against
    # 0.139 OD off the plane), which is what the rebuild from two stains keeps.
    assert _off_plane(cmu1_tissue, he) < 0.75 * _off_plane(cmu1_tissue, he_c)


def test_too_few_stained_pixels_are_refused():
    with pytest.raises(ValueError, match="stained pixels"):
        macenko.fit_macenko(np.full((500, 3), 235, np.uint8))


def test_a_colour_on_the_stain_plane_keeps_itself_under_the_slides_own_fit(cmu1_path):
    """The map's inverse undoes the density -log((I + 1) / IO) exactly: torchstain's
    IO * exp(-OD) would brighten every pixel by one grey level."""
    from stainctl.normalize.classical import Normaliser, StainFit

    ref = load_reference(cmu1_path)
    target = dict(Normaliser.to_reference("macenko", ref).target)
    he = np.asarray(target["stain_matrix"])
    c = np.stack(np.meshgrid(np.linspace(0.2, 2.5, 40), np.linspace(0.2, 2.5, 40)), -1)
    rgb = macenko.IO * np.exp(-c.reshape(-1, 2) @ he.T) - 1
    fit = StainFit(method="macenko", source=target, target=target)
    out = fit.apply_colours(rgb.astype(np.float32)).astype(np.float64)
    assert np.abs(out - np.rint(rgb)).max() <= 1
    assert abs(float((out - rgb).mean())) < 0.1


def test_the_reference_is_read_at_the_grid_resolution_not_resampled(cmu1_path):
    from stainctl.slide.reader import open_slide

    slide = open_slide(cmu1_path)  # 0.499 µm/px, one level
    own = slide.read_region(0, 0, 0, *slide.dimensions)
    slide.close()
    # 0.5 and 0.503 are within 1 % of the slide's 0.499: its pixels as stored, as the tile grid
    # reads them (a resize by 0.998 would blur them).
    for mpp in (0.5, 0.503):
        assert np.array_equal(load_reference(cmu1_path, mpp).image, own)
    coarse = load_reference(cmu1_path, 0.6).image
    assert coarse is not None and coarse.shape == (round(2967 * 0.499 / 0.6),
                                                   round(2220 * 0.499 / 0.6), 3)


def test_a_tile_is_looked_up_by_its_rgba_word_as_its_colour_maps(cmu1_path, he_ome_path):
    """The table is indexed by a pixel's RGBA word (b<<16|g<<8|r): a tile, RGB or RGBA, comes
    out exactly as its colours map one by one (Reinhard's table is that mapping)."""
    from stainctl.normalize.classical import Normaliser
    from stainctl.normalize.sample import from_tiles
    from stainctl.slide.reader import open_slide

    s = open_slide(he_ome_path)
    img = s.read_region(0, 0, 0, 512, 512)
    s.close()
    transform = Normaliser.to_reference("reinhard", load_reference(cmu1_path)).for_slide(
        from_tiles([img], "os1"))
    rng = np.random.default_rng(0)
    tiles = np.stack([img, rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)])
    expected = transform.fit.apply_colours(tiles.reshape(-1, 3).astype(np.float32))
    out = transform.apply(tiles)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out.reshape(-1, 3), expected)
    rgba = np.concatenate([tiles, rng.integers(0, 256, (2, 512, 512, 1), dtype=np.uint8)], -1)
    np.testing.assert_array_equal(transform.apply(rgba), out)  # alpha ignored
    np.testing.assert_array_equal(transform.apply(tiles[0]), out[0])  # one tile, no batch


def test_status_names_the_plane_and_reads_fits_recorded_before_it_was_kept():
    from stainctl.cli.status import fit_line

    part = {"stain_matrix": [[0.8, 0.1], [0.5, 0.9], [0.3, 0.4]],
            "max_concentration": [2.9, 2.8], "glass": [246, 243, 243]}
    line = fit_line({"method": "macenko", "source": {**part, "plane": "origin"},
                     "target": part})  # the target as an older workspace holds it
    assert line.startswith("macenko fitted: slide H (0.8,0.5,0.3) E (0.1,0.9,0.4)")
    assert "max C (2.9,2.8) plane origin;" in line and line.endswith("plane centred")
