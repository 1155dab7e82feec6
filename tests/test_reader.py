"""Every real slide opens with the right dimensions and mpp, checked against the libraries."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from conftest import CMU1, DATA, NDPI_DAPI, OME_HE, OME_KI67, PNG_IHC
from PIL import Image

from stainctl.errors import SlideError
from stainctl.slide import open_slide


@pytest.mark.parametrize("path", [CMU1, NDPI_DAPI], ids=lambda p: p.name)
def test_openslide_formats_match_openslide(path):
    ref = openslide.OpenSlide(str(path))
    s = open_slide(path)
    assert s.backend == "openslide"
    assert s.level_dimensions == ref.level_dimensions
    assert s.mpp == pytest.approx(float(ref.properties["openslide.mpp-x"]))
    assert s.objective_power == float(ref.properties["openslide.objective-power"])
    assert s.vendor == ref.properties["openslide.vendor"]


def test_svs_level0_matches_tifffile(cmu1_path):
    with tifffile.TiffFile(cmu1_path) as tf:
        page = tf.pages[0]
        assert open_slide(cmu1_path).dimensions == (page.imagewidth, page.imagelength)
        desc = page.description
    # The Aperio header states MPP = 0.4990.
    assert "MPP = 0.499" in desc
    assert open_slide(cmu1_path).mpp == pytest.approx(0.499)


@pytest.mark.parametrize("path", [OME_HE, *OME_KI67], ids=lambda p: p.name)
def test_ome_tiff_falls_back_to_tiffslide(path):
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(str(path))
    s = open_slide(path)
    assert s.backend == "tiffslide"
    with tifffile.TiffFile(path) as tf:
        shape = tf.series[0].shape
        pixels = tf.ome_metadata.split('PhysicalSizeX="')[1].split('"')[0]
    assert s.dimensions == (shape[1], shape[0])
    assert s.mpp == pytest.approx(float(pixels), rel=1e-3)


def test_ome_pixels_match_tifffile(he_ome_path):
    s = open_slide(he_ome_path)
    region = s.read_region(100, 200, 0, 64, 48)
    ref = tifffile.imread(he_ome_path)[200:248, 100:164, :3]
    np.testing.assert_array_equal(region, ref)


@pytest.mark.parametrize("path", [PNG_IHC, *sorted((DATA / "paired").glob("*/*.jpg"))],
                         ids=lambda p: p.name)
def test_plain_images_are_one_level_slides_without_mpp(path):
    s = open_slide(path)
    with Image.open(path) as im:
        assert s.dimensions == im.size
        ref = np.asarray(im.convert("RGB"))
    assert s.level_dimensions == (im.size,)
    assert s.mpp is None
    with pytest.raises(SlideError, match="--mpp"):
        s.require_mpp()
    if path.suffix == ".png":  # lossless: pixels must be identical
        np.testing.assert_array_equal(s.read_region(0, 0, 0, *im.size), ref)
    assert open_slide(path, mpp=0.5).mpp == 0.5


def test_mpp_override_replaces_metadata(cmu1_path):
    s = open_slide(cmu1_path, mpp=0.25)
    assert (s.mpp, s.mpp_source) == (0.25, "override")


def test_regions_outside_the_slide_read_as_white(cmu1_path):
    s = open_slide(cmu1_path)
    w, h = s.dimensions
    region = s.read_region(w - 10, h - 10, 0, 20, 20)
    assert (region[10:, :] == 255).all() and (region[:, 10:] == 255).all()
    ref = np.asarray(openslide.OpenSlide(str(cmu1_path)).read_region((w - 10, h - 10), 0, (10, 10)))
    np.testing.assert_array_equal(region[:10, :10], ref[..., :3])


@pytest.mark.parametrize("name,content,match", [
    ("notes.txt", b"hello", "unsupported file type"),
    ("fake.svs", b"not a slide at all", "neither OpenSlide nor tiffslide"),
    ("empty.png", b"", "cannot read the image header"),
])
def test_bad_files_raise_slide_error_naming_the_file(tmp_path, name, content, match):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(SlideError, match=match) as info:
        open_slide(bad)
    assert str(bad) in str(info.value)
