"""The grid is laid on a pyramid level's pixels (and so on its stored tiles) when the target
µm/px is that level's, within SNAP_TOLERANCE; otherwise it is the plain target grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CMU1

from stainctl.slide import direct
from stainctl.slide.grid import SNAP_TOLERANCE, GridParams, make_grid, snap_level
from stainctl.slide.reader import open_slide
from stainctl.slide.tiles import read_tile

SVS_DOWNSAMPLES = (1.0, 4.000345, 16.00291)  # the shape of a real Aperio pyramid's levels


def test_target_at_a_level_snaps_to_its_pixels() -> None:
    g = make_grid(46_000, 32_000, 0.499, GridParams(0.5, 512, 64), SVS_DOWNSAMPLES)
    assert g.level == 0 and g.extent0 == 512 and g.stride0 == 448 and g.mpp == 0.499
    g1 = make_grid(46_000, 32_000, 0.499, GridParams(2.0, 256, 0), SVS_DOWNSAMPLES)
    assert g1.level == 1 and g1.mpp == pytest.approx(0.499 * 4.000345)
    xs, _ = g1.origins()
    # Every origin maps back to a whole level-1 pixel on the tile lattice.
    ds = SVS_DOWNSAMPLES[1]
    assert np.array_equal(np.round(xs[:g1.cols] / ds), np.arange(g1.cols) * 256)
    assert np.abs(xs / ds - np.round(xs / ds)).max() < 0.5 / ds


def test_target_between_levels_is_not_snapped() -> None:
    g = make_grid(46_000, 32_000, 0.499, GridParams(1.0, 512, 0), SVS_DOWNSAMPLES)
    assert g.level is None and g.mpp == 1.0 and g.extent0 == pytest.approx(512 / 0.499)
    off = 0.5 * (1 + 1.5 * SNAP_TOLERANCE)  # just outside the tolerance
    assert snap_level(off / 0.5, SVS_DOWNSAMPLES) is None
    assert snap_level(1 + 0.9 * SNAP_TOLERANCE, SVS_DOWNSAMPLES) == 0
    # Without the slide's levels (evaluate's sampling) the grid is the target's, as before.
    assert make_grid(2220, 2967, 0.499, GridParams(0.5, 512)).extent0 == pytest.approx(
        512 * 0.5 / 0.499)


def _pyramid(tmp_path: Path, mpp: float, tile: int) -> Path:
    import pyvips

    from stainctl.stitch.pyramid import PyramidOptions, save_pyramid

    src = open_slide(CMU1)
    rgb = np.ascontiguousarray(src.read_region(0, 0, 0, 2048, 2048))
    src.close()
    out = tmp_path / "pyramid.tif"
    save_pyramid(pyvips.Image.new_from_array(rgb, interpretation="srgb"), out, mpp,
                 "test", PyramidOptions(format="tiff", compression="jpeg", tile=tile))
    return out


def test_snapped_grid_tiles_are_the_stored_tiles(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.2495 µm/px pyramid with 256-px stored tiles, tiled at 0.25 µm/px in 512-px tiles:
    each grid tile is exactly 2 x 2 stored tiles, read without resampling, each stored tile
    decoded once."""
    path = _pyramid(tmp_path, 0.2495, 256)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.2495, rel=1e-4)
    grid = make_grid(*slide.dimensions, slide.mpp, GridParams(0.25, 512),
                     slide.level_downsamples)
    assert grid.level == 0 and grid.extent0 == 512 and grid.mpp == pytest.approx(0.2495, 1e-4)
    decoded: list[int] = []
    real = direct._decode

    def counting(lv: direct.StoredLevel, data: bytes, index: int) -> np.ndarray:
        decoded.append(index)
        return real(lv, data, index)

    monkeypatch.setattr(direct, "_decode", counting)
    xs, ys = grid.origins()
    for x, y in zip(xs, ys, strict=True):
        assert x % 256 == 0 and y % 256 == 0
        tile = read_tile(slide, int(x), int(y), grid.extent0, 512)
        assert np.array_equal(tile, slide.read_region(int(x), int(y), 0, 512, 512))
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 64  # 8 x 8 stored tiles
    # The same slide tiled at the plain target (no levels given) is resampled from 514 px.
    plain = make_grid(*slide.dimensions, slide.mpp, GridParams(0.25, 512))
    assert plain.level is None and plain.extent0 > 513


def test_tile_step_records_the_level_mpp(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    path = _pyramid(tmp_path, 0.2495, 256)
    r = cli("tile", path, "-w", tmp_path / "ws", "--target-mpp", "0.25", "--tile-size", "512",
            "--min-tissue", "0.1")
    assert r.exit_code == 0, r.output
    db = sqlite3.connect(tmp_path / "ws" / "manifest.sqlite")
    extent0, stride0, mpp = db.execute("SELECT extent0, stride0, target_mpp FROM grids").fetchone()
    db.close()
    assert extent0 == 512 and stride0 == 512 and mpp == pytest.approx(0.2495, rel=1e-4)
