"""Tile store, blending and pyramid output, on real H&E tiles cut from the CMU-1 sample."""

from __future__ import annotations

import errno
import json
import signal
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CMU1

from stainctl.evaluate.seams import seam_score
from stainctl.slide.reader import open_slide
from stainctl.stitch.blend import Canvas, ramps
from stainctl.stitch.pyramid import PyramidOptions
from stainctl.stitch.stitcher import Overlay, stitch_store
from stainctl.workspace import SlideRecord
from stainctl.workspace.tilestore import (
    StoreError,
    StoreLayout,
    TileStore,
    chunk_file,
    create_for_slide,
)

BG = (245, 245, 245)


@pytest.fixture(scope="module")
def cmu1(cmu1_path) -> np.ndarray:
    """The whole CMU-1 sample at level 0 (2220 x 2967, 0.499 µm/px)."""
    slide = open_slide(cmu1_path)
    w, h = slide.dimensions
    return slide.read_region(0, 0, 0, w, h)


def _layout(image: np.ndarray, tile: int, overlap: int, margin: int,
            mpp: float = 0.499) -> StoreLayout:
    h, w = image.shape[:2]
    stride = tile - overlap
    cols = 1 + max(0, -(-(w - tile) // stride))
    rows = 1 + max(0, -(-(h - tile) // stride))
    return StoreLayout(w, h, mpp, cols, rows, tile, overlap, margin)


def _crop(image: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """A side x side crop at (x, y); outside the image reads as white glass, as slides do."""
    h, w = image.shape[:2]
    out = np.full((side, side, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, w), min(y + side, h)
    out[y0 - y:y1 - y, x0 - x:x1 - x] = image[y0:y1, x0:x1]
    return out


def _store(path: Path, image: np.ndarray, layout: StoreLayout, *, skip=(), offsets=None,
           meta=None) -> TileStore:
    """A store whose tiles are crops of `image` with their margins (an identity translation),
    optionally shifted in brightness per tile."""
    store = TileStore.create(path, layout, meta or {"marker": "he", "model": "identity"})
    for r in range(layout.rows):
        for c in range(layout.cols):
            if (c, r) in skip:
                continue
            tile = _crop(image, *layout.origin(c, r), layout.side)
            if offsets is not None:
                tile = np.clip(tile.astype(np.int16) + offsets[r, c], 0, 255).astype(np.uint8)
            store.write(c, r, tile)
    store.finish()
    return store


def _canvas(store: TileStore, background=BG) -> np.ndarray:
    return np.vstack(list(Canvas(store, background).blocks()))


# --- tile store ---------------------------------------------------------------------------
def test_store_round_trip_resume_and_mismatch(tmp_path, cmu1):
    lay = _layout(cmu1, 256, 32, 16)
    store = TileStore.create(tmp_path / "s.zarr", lay, {"marker": "he"})
    tile = _crop(cmu1, *lay.origin(2, 3), lay.side)
    store.write(2, 3, tile)
    assert not store.complete
    # A crash leaves zarr's temporary chunk file behind: it must not count as a tile.
    partial = tmp_path / "s.zarr" / "c" / "4" / "1" / "0" / "0" / "0.abc.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a tile")

    again = TileStore.create(tmp_path / "s.zarr", lay, {"marker": "he"})  # resume
    assert again.generation == store.generation
    mask = again.written()
    assert mask.sum() == 1 and mask[3, 2]
    assert np.array_equal(again.read(2, 3), tile)
    # Stitching decodes chunk files directly (zarr's per-chunk overhead is 3x the decoding),
    # tile by tile into reused buffers: it must read exactly what zarr reads, absent tiles
    # included (zeros, whatever the buffer held).
    assert again._direct
    row = {}
    for is_direct in (True, False):
        again._direct = is_direct
        row[is_direct] = np.stack([
            again.read_into(col, 3, np.full((lay.side, lay.side, 3), 7, np.uint8))
            for col in range(lay.cols)])
    assert np.array_equal(row[True], row[False])
    assert np.array_equal(row[True][2], tile) and not row[True][0].any()
    again.finish()
    assert TileStore.open(tmp_path / "s.zarr").complete

    with pytest.raises(StoreError, match="other settings"):
        TileStore.create(tmp_path / "s.zarr", _layout(cmu1, 256, 0, 16), {"marker": "he"})
    with pytest.raises(StoreError, match="uint8"):
        store.write(0, 0, tile[:10])
    with pytest.raises(StoreError, match="outside"):
        store.write(lay.cols, 0, tile)
    with pytest.raises(StoreError, match="too wide"):
        _layout(cmu1, 256, 32, 100).validate()
    with pytest.raises(StoreError, match="no tile store"):
        TileStore.open(tmp_path / "missing.zarr")


def test_direct_writes_are_the_chunk_files_zarr_writes(tmp_path, cmu1, monkeypatch):
    """translate writes chunk files itself (zarr's write path capped a GPU's throughput): the
    same bytes as zarr's, read back by zarr, from many threads at once, and a failed write
    names the store's file and leaves nothing under it."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    lay = _layout(cmu1, 256, 32, 16)
    direct = TileStore.create(tmp_path / "d.zarr", lay, {"marker": "he"})
    via_zarr = TileStore.create(tmp_path / "z.zarr", lay, {"marker": "he"})
    assert direct._direct
    via_zarr._direct = False
    cells = [(c, r) for r in range(lay.rows) for c in range(lay.cols)]
    tiles = {cell: _crop(cmu1, *lay.origin(*cell), lay.side) for cell in cells}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda cell: direct.write(*cell, tiles[cell]), cells))
    for cell in cells[:3]:
        via_zarr.write(*cell, tiles[cell])
        assert chunk_file(tmp_path / "d.zarr", *cell).read_bytes() == \
            chunk_file(tmp_path / "z.zarr", *cell).read_bytes()
    array = zarr.open_array(str(tmp_path / "d.zarr"), mode="r")
    for (c, r), tile in tiles.items():
        assert np.array_equal(array[r, c], tile)
    assert direct.written().all()
    assert not [p for p in (tmp_path / "d.zarr").rglob("*") if p.name.endswith(".partial")]
    direct.write(0, 0, np.zeros_like(tiles[0, 0]))  # a black tile is a written tile
    assert direct.written()[0, 0] and not direct.read(0, 0).any()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        direct.write(1, 1, tiles[1, 1])
    assert err.value.filename == str(chunk_file(tmp_path / "d.zarr", 1, 1))
    assert not [p for p in (tmp_path / "d.zarr").rglob("*") if p.name.endswith(".partial")]


def test_read_only_open_reads_the_metadata_without_zarr(tmp_path, cmu1):
    """Stitching opens its store read-only from zarr.json alone (importing zarr was ~0.2 s of
    the process's start-up); anything not laid out as `create` makes it goes through zarr."""
    import zarr

    lay = _layout(cmu1, 256, 32, 16)
    store = TileStore.create(tmp_path / "s.zarr", lay, {"marker": "he", "model": "m"})
    tile = _crop(cmu1, *lay.origin(1, 2), lay.side)
    store.write(1, 2, tile)
    ro = TileStore.open(tmp_path / "s.zarr", writable=False)
    assert ro._zarr is None and ro._direct
    assert (ro.layout, ro.meta, ro.generation) == (store.layout, store.meta, store.generation)
    assert not ro.complete
    out = np.full((lay.side, lay.side, 3), 7, np.uint8)
    assert np.array_equal(ro.read_into(1, 2, out), tile)
    assert not ro.read_into(0, 2, out).any()  # absent: zeros, as zarr's fill value
    assert np.array_equal(ro.read(1, 2), tile)  # read directly too
    store.finish()
    assert TileStore.open(tmp_path / "s.zarr", writable=False).complete

    # Another codec: the metadata check fails, zarr reads it.
    other = zarr.create_array(str(tmp_path / "z.zarr"), shape=(lay.rows, lay.cols, lay.side,
                              lay.side, 3), chunks=(1, 1, lay.side, lay.side, 3), dtype="uint8",
                              fill_value=0, compressors=None,
                              chunk_key_encoding={"name": "default", "separator": "/"},
                              attributes=dict(zarr.open_array(str(tmp_path / "s.zarr")).attrs))
    other[2, 1] = tile
    ro = TileStore.open(tmp_path / "z.zarr", writable=False)
    assert ro._zarr is not None and not ro._direct
    assert np.array_equal(ro.read_into(1, 2, out), tile)


def test_reading_tiles_on_a_main_thread_starts_no_blosc_threads(tmp_path, cmu1):
    """Blosc would decode each tile with a pool of threads when called from a main thread,
    slower in wall and CPU time (bench/RESULTS.md). Counted in a fresh process: the pool, once
    started, lives as long as the process. The control shows the count would see it."""
    import os

    lay = _layout(cmu1, 512, 64, 32)
    store = TileStore.create(tmp_path / "s.zarr", lay, {"marker": "he"})
    store.write(1, 1, _crop(cmu1, *lay.origin(1, 1), lay.side))
    code = f"""
import os, numpy as np, numcodecs.blosc
from pathlib import Path
from stainctl.workspace.tilestore import TileStore
threads = lambda: len(os.listdir("/proc/self/task"))
store = TileStore.open(Path({str(tmp_path / "s.zarr")!r}), writable=False)
out = np.empty((store.layout.side,) * 2 + (3,), np.uint8)
before = threads()
for _ in range(3):
    store.read_into(1, 1, out)
after = threads()
numcodecs.blosc.use_threads = None  # the default
blob = Path({str(chunk_file(tmp_path / "s.zarr", 1, 1))!r}).read_bytes()
numcodecs.blosc.Blosc().decode(blob, out=out)
print(before, after, threads())
"""
    before, after, control = map(int, subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert after == before
    if (os.cpu_count() or 1) > 1:
        assert control > after


def test_a_writable_store_reads_its_metadata_once(tmp_path, cmu1, monkeypatch):
    """Opened writable, a store takes its layout check from the metadata zarr read, not from a
    second read of zarr.json; the check still tells a plain store from another codec's."""
    import zarr

    from stainctl.workspace import tilestore

    lay = _layout(cmu1, 256, 32, 16)
    TileStore.create(tmp_path / "s.zarr", lay, {"marker": "he"})
    other = zarr.create_array(str(tmp_path / "z.zarr"), shape=(lay.rows, lay.cols, lay.side,
                              lay.side, 3), chunks=(1, 1, lay.side, lay.side, 3), dtype="uint8",
                              fill_value=0, compressors=None,
                              attributes=dict(zarr.open_array(str(tmp_path / "s.zarr")).attrs))
    del other

    def no_second_read(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(tilestore, "_plain_blosc_attrs", no_second_read)
    assert TileStore.open(tmp_path / "s.zarr")._direct
    assert not TileStore.open(tmp_path / "z.zarr")._direct


# --- blending -----------------------------------------------------------------------------
def test_ramps_are_a_partition_of_unity():
    out, fade_in = ramps(64)
    assert np.allclose(out + fade_in, 1.0, atol=1e-6)
    assert np.all(np.diff(fade_in) > 0) and fade_in[0] < 0.01 and fade_in[-1] > 0.99


def test_blending_identical_overlaps_reproduces_the_slide(tmp_path, cmu1):
    lay = _layout(cmu1, 256, 32, 16)
    canvas = _canvas(_store(tmp_path / "s.zarr", cmu1, lay))
    assert canvas.shape == cmu1.shape
    # Neighbours agree on their overlap, so the weighted mean is the slide (+-1 for rounding).
    assert np.abs(canvas.astype(int) - cmu1).max() <= 1


def test_band_buffers_are_reused_only_once_their_blocks_are_gone(tmp_path, cmu1):
    lay = _layout(cmu1, 256, 32, 16)
    offsets = np.random.default_rng(1).integers(-40, 40, (lay.rows, lay.cols))
    store = _store(tmp_path / "s.zarr", cmu1, lay, offsets=offsets)
    held = _canvas(store)  # every block kept until the end: no band may be refilled under them
    canvas = Canvas(store, BG)
    streamed = np.vstack([block.copy() for block in canvas.blocks()])  # each one let go at once
    assert np.array_equal(streamed, held)
    assert lay.rows > 4 and len(canvas._bands) <= 3  # buffers were reused, not one per row


def test_the_heap_is_trimmed_band_by_band(tmp_path, cmu1, monkeypatch):
    # What a band freed (the encoder's buffers, blend temporaries) must not pile up in malloc's
    # arenas with the slide's area (stainctl/heap.py): the canvas asks for a trim after every band.
    from stainctl import heap

    calls = []
    monkeypatch.setattr(heap, "trim", lambda every=heap.EVERY: calls.append(every) or False)
    lay = _layout(cmu1, 256, 32, 16)
    list(Canvas(_store(tmp_path / "s.zarr", cmu1, lay), BG).blocks())
    assert len(calls) == lay.rows


def test_missing_tiles_become_background_with_a_soft_edge(tmp_path, cmu1):
    lay = _layout(cmu1, 256, 0, 32)
    hole = (4, 5)
    canvas = _canvas(_store(tmp_path / "s.zarr", cmu1, lay, skip={hole}), (200, 210, 220))
    x0, y0 = hole[0] * lay.stride, hole[1] * lay.stride
    core = canvas[y0 + 40:y0 + 216, x0 + 40:x0 + 216]
    assert (core == (200, 210, 220)).all()
    # Across the hole's left border the image goes from tissue to background over the blend
    # band: the difference to the background shrinks monotonically on average.
    row = canvas[y0 + 60:y0 + 200, x0 - 40:x0 + 40].astype(float)
    dist = np.abs(row - (200, 210, 220)).mean(axis=(0, 2))
    assert dist[:8].mean() > 4 * dist[-8:].mean() + 1
    assert dist[-8:].mean() < 3
    untouched = canvas[: y0 - 40]
    assert np.abs(untouched.astype(int) - cmu1[: y0 - 40]).max() <= 1


def test_blended_tile_borders_show_no_seam_and_hard_ones_do(tmp_path, cmu1):
    rng = np.random.default_rng(1)
    # Mostly tissue; borders off the source's 8-px JPEG block grid, whose edges would add a
    # seam of their own.
    region = cmu1[303:2603, 405:2005]
    soft = _layout(region, 256, 0, 32)
    offsets = rng.integers(-14, 15, (soft.rows, soft.cols, 1, 1, 1))
    blended = _canvas(_store(tmp_path / "soft.zarr", region, soft, offsets=offsets))
    hard = _layout(region, 256, 0, 0)  # no context margin: nothing to blend over
    cut = _canvas(_store(tmp_path / "hard.zarr", region, hard, offsets=offsets))

    s_blend = seam_score(blended, *soft.borders())
    s_cut = seam_score(cut, *hard.borders())
    s_source = seam_score(region, *soft.borders())
    assert s_blend.lines == len(soft.borders()[0]) + len(soft.borders()[1]) > 10
    assert abs(s_source.ratio - 1) < 0.1  # untouched tissue: the baseline
    assert s_blend.ratio < s_source.ratio + 0.05, (s_blend, s_source)
    # The same offsets without blending: a visible seam, so the score can fail.
    assert s_cut.ratio > s_source.ratio + 0.5, (s_cut, s_source)


# --- pyramid output -----------------------------------------------------------------------
def _levels(width: int, height: int, tile: int) -> int:
    n = 1
    while max(width, height) > tile and min(width, height) > 1:
        width, height, n = width // 2, height // 2, n + 1
    return n


def test_ome_tiff_round_trip_read_by_tiffslide(tmp_path, cmu1):
    import tifffile
    import tiffslide

    lay = _layout(cmu1, 256, 32, 16)
    store = _store(tmp_path / "s.zarr", cmu1, lay)
    name = 'CMU-1 "A&B" <left>.svs'
    res = stitch_store(store, tmp_path / "out.ome.tif", options=PyramidOptions(),
                       background=BG, name=name,
                       annotations={"marker": "he", "model": "m&m <1>", "source": name})
    assert res.path.exists() and res.thumbnail.exists()
    assert not list(tmp_path.glob(".*tmp*"))

    slide = tiffslide.TiffSlide(res.path)
    assert slide.dimensions == (cmu1.shape[1], cmu1.shape[0])
    assert slide.level_count == _levels(*slide.dimensions, 512) > 2
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499, rel=0.01)
    back = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    assert cv2.PSNR(back, cmu1) > 35
    low = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB"))
    lw, lh = slide.level_dimensions[2]  # each pixel the mean of 4 x 4 of level 0
    ref = cv2.resize(cmu1[:lh * 4, :lw * 4], (lw, lh), interpolation=cv2.INTER_AREA)
    assert cv2.PSNR(low, ref) > 30

    with tifffile.TiffFile(res.path) as tif:
        assert tif.is_ome and len(tif.series[0].levels) == slide.level_count
        xml = ET.fromstring(tif.ome_metadata)
        page = tif.pages[0]
        # The TIFF resolution tags agree with the OME-XML (centimetres, 0.499 µm/px).
        assert page.tags["ResolutionUnit"].value == 3
        xres = page.tags["XResolution"].value
        assert 1e4 / (xres[0] / xres[1]) == pytest.approx(0.499, rel=0.01)
    ns = {"o": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    assert xml.find("o:Image", ns).get("Name") == name
    pixels = xml.find("o:Image/o:Pixels", ns)
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(0.499, rel=0.01)
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    values = {m.get("K"): m.text for m in xml.iterfind(".//o:M", ns)}
    assert values["model"] == "m&m <1>" and values["source"] == name

    thumb = cv2.imread(str(res.thumbnail))
    assert max(thumb.shape[:2]) == 1024


@pytest.mark.parametrize("quality", [90, 80])  # JPEG tiles in RGB, and in YCbCr 4:2:0
def test_plain_tiff_levels_are_read_by_openslide(tmp_path, cmu1, quality):
    import openslide

    lay = _layout(cmu1, 256, 32, 16)
    store = _store(tmp_path / "s.zarr", cmu1, lay)
    res = stitch_store(store, tmp_path / "out.tif",
                       options=PyramidOptions("tiff", "jpeg", quality, 256), background=BG,
                       name="CMU-1", annotations={"marker": "he", "model": "identity"})
    slide = openslide.OpenSlide(res.path)
    assert slide.dimensions == (cmu1.shape[1], cmu1.shape[0])
    assert slide.level_count == _levels(*slide.dimensions, 256) > 3
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499, rel=0.01)
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    back = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    assert cv2.PSNR(back, cmu1) > (35 if quality == 90 else 30)


def test_lossless_compressions_keep_pixels(tmp_path, cmu1):
    import tiffslide

    region = cmu1[:700, :900]
    store = _store(tmp_path / "s.zarr", region, _layout(region, 256, 0, 16))
    for comp in ("lzw", "deflate", "none"):
        res = stitch_store(store, tmp_path / f"{comp}.ome.tif",
                           options=PyramidOptions("ome-tiff", comp), background=BG,
                           name="x", annotations={})
        slide = tiffslide.TiffSlide(res.path)
        back = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        assert np.abs(back.astype(int) - region).max() <= 1, comp


def test_the_pyramid_writer_writes_what_libvips_writes(tmp_path, cmu1):
    """stainctl's writer (tifffile + imagecodecs) against libvips' tiffsave of the same raster,
    an odd-sized real slide given in uneven row blocks: the same levels, and at every level the
    same decoded pixels (JPEG: the same libjpeg-turbo and tables; lossless: exact)."""
    import pyvips
    import tifffile

    from stainctl.stitch.pyramid import save_pyramid
    from stainctl.stitch.tiffwriter import write_pyramid

    thin = np.ascontiguousarray(cmu1[:3, :300])  # a level's height reaches 1 before the tile
    cases = [(cmu1, PyramidOptions("ome-tiff", "jpeg"), 4, 2),  # Q90: RGB
             (cmu1, PyramidOptions("ome-tiff", "jpeg", 80), 4, 6),  # below 90: YCbCr 4:2:0
             (cmu1, PyramidOptions("ome-tiff", "deflate"), 4, 2),
             (thin, PyramidOptions("ome-tiff", "none", tile=16), 2, 2)]
    for i, (image, options, levels, photometric) in enumerate(cases):
        h, w = image.shape[:2]
        ours, theirs = tmp_path / f"ours-{i}.ome.tif", tmp_path / f"vips-{i}.ome.tif"
        n = write_pyramid((image[y:y + 333] for y in range(0, h, 333)), w, h, ours, mpp=0.5,
                          description="x", options=options)
        save_pyramid(pyvips.Image.new_from_array(image, interpretation="srgb"), theirs, 0.5,
                     "x", options)
        with tifffile.TiffFile(ours) as a, tifffile.TiffFile(theirs) as b:
            mine, vips = a.series[0].levels, b.series[0].levels
            assert n == len(mine) == len(vips) == _levels(w, h, options.tile) == levels
            for k, (x, y) in enumerate(zip(mine, vips, strict=True)):
                assert x.shape == y.shape
                assert np.array_equal(x.asarray(), y.asarray()), (options, x.shape)
                # Each level carries its own pixel size: 2e4 px/cm at level 0's 0.5 µm/px,
                # halved per level, the same across and down (square pixels).
                for tag in ("XResolution", "YResolution"):
                    num, den = x.keyframe.tags[tag].value
                    assert num / den == pytest.approx(2e4 / 2**k, rel=1e-9), (tag, k)
            assert a.pages[0].photometric == b.pages[0].photometric == photometric
        assert ours.stat().st_size < 1.05 * theirs.stat().st_size, options


def test_the_pyramid_writer_copes_with_reused_blocks(tmp_path, cmu1):
    """The canvas' blocks live in a ring: one is overwritten once two more are taken. A writer
    that kept a block longer would write the later block's pixels in its place."""
    import tifffile

    from stainctl.stitch.tiffwriter import write_pyramid

    h, w = cmu1.shape[:2]
    ring = np.empty((2, 200, w, 3), np.uint8)

    def blocks():
        for i, y in enumerate(range(0, h, 200)):
            rows = cmu1[y:y + 200]
            slot = ring[i % 2, :len(rows)]
            slot[:] = rows
            yield slot

    out = tmp_path / "ring.tif"
    write_pyramid(blocks(), w, h, out, mpp=0.5, description="x",
                  options=PyramidOptions("tiff", "none", tile=256))
    with tifffile.TiffFile(out) as tif:
        assert np.array_equal(tif.pages[0].asarray(), cmu1)
        assert len(tif.pages) == _levels(w, h, 256)  # plain TIFF: the levels are pages


def canvas_processes(under: Path) -> list[str]:
    """Pids of running canvas child processes (stainctl/stitch/canvas_process.py) of stores
    under `under` (other tests or benchmarks may stitch at the same time)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"stainctl.stitch.canvas_process" in args and \
                any(a.startswith(bytes(under)) for a in args):
            found.append(cmdline.parent.name)
    return found


def _level0(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[0].asarray()


def test_the_canvas_process_stitches_what_a_thread_does(tmp_path, cmu1):
    from stainctl.stitch import canvas_process

    assert canvas_process.available()  # Linux: the default path
    lay = _layout(cmu1, 256, 32, 16)
    offsets = np.random.default_rng(2).integers(-40, 40, (lay.rows, lay.cols))
    store = _store(tmp_path / "s.zarr", cmu1, lay, offsets=offsets, skip={(3, 4), (4, 4)})
    # More band rows than ring slots: slots are refilled while the writer still reads the canvas.
    assert lay.rows > 2 * canvas_process.SLOTS
    outputs = {}
    for in_process in (False, True):
        res = stitch_store(store, tmp_path / f"{in_process}.ome.tif",
                           options=PyramidOptions("ome-tiff", "none"), background=BG, name="x",
                           annotations={}, in_process=in_process)
        # The shared ring is unmapped when the stitch returns, not at some later collection.
        assert "stainctl-canvas" not in Path("/proc/self/maps").read_text()
        outputs[in_process] = _level0(res.path)
    assert np.array_equal(outputs[False], _canvas(store))
    assert np.array_equal(outputs[False], outputs[True])
    assert not canvas_processes(tmp_path)


def test_the_canvas_process_yields_to_the_encoder(tmp_path, cmu1):
    import os

    from stainctl.stitch.canvas_process import NICE, CanvasProcess

    lay = _layout(cmu1, 256, 32, 16)
    store = _store(tmp_path / "s.zarr", cmu1, lay)
    with CanvasProcess(store, BG, store.written()) as child:
        first = next(child.blocks())  # by then the child has lowered its priority
        assert first.shape[1:] == (lay.width, 3)
        pid = child._child.pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + NICE
        # Same session: under autogroup scheduling a session of its own would be a group with
        # its own full share of the CPU, and the lower priority would not count against the
        # encoder.
        assert os.getsid(pid) == os.getsid(0)
    assert not canvas_processes(tmp_path)


def _pipes_and_memfds() -> set[tuple[str, str]]:
    """This process's open pipes and memfds, (fd, what it is): what a canvas process leaves
    open if it is not cleaned up (other fds come and go with the rest of the test session)."""
    import os

    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("pipe:", "/memfd:")):
            found.add((fd, target))
    return found


def test_a_canvas_process_that_cannot_start_leaves_the_blending_to_a_thread(
        tmp_path, cmu1, monkeypatch):
    import os

    def no_memory(name: str) -> int:
        raise OSError(12, "Cannot allocate memory")

    lay = _layout(cmu1, 256, 32, 16)
    store = _store(tmp_path / "s.zarr", cmu1, lay)
    stitch_store(store, tmp_path / "warm.ome.tif", options=PyramidOptions(), background=BG,
                 name="x", annotations={})  # what libvips keeps open once used is counted
    fds = _pipes_and_memfds()
    monkeypatch.setattr(os, "memfd_create", no_memory)
    res = stitch_store(store, tmp_path / "o.ome.tif", options=PyramidOptions("ome-tiff", "none"),
                       background=BG, name="x", annotations={})
    assert np.array_equal(_level0(res.path), _canvas(store))
    assert _pipes_and_memfds() <= fds  # nothing left open

    # The same when the process itself cannot be started, after the memfd and pipes were made.
    import subprocess

    monkeypatch.undo()

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    res = stitch_store(store, tmp_path / "p.ome.tif", options=PyramidOptions("ome-tiff", "none"),
                       background=BG, name="x", annotations={})
    assert np.array_equal(_level0(res.path), _canvas(store))
    assert _pipes_and_memfds() <= fds


def test_a_failure_in_the_canvas_process_fails_the_stitch_as_on_a_thread(tmp_path, cmu1):
    lay = _layout(cmu1, 256, 32, 16)
    store = _store(tmp_path / "s.zarr", cmu1, lay)
    chunk_file(store.path, 2, 6).write_bytes(b"not a blosc chunk")
    errors = {}
    for in_process in (False, True):
        out = tmp_path / f"{in_process}.ome.tif"
        with pytest.raises(Exception) as err:
            stitch_store(store, out, options=PyramidOptions(), background=BG, name="x",
                         annotations={}, in_process=in_process)
        errors[in_process] = (type(err.value), str(err.value))
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    assert errors[False] == errors[True]
    kind, message = errors[False]
    assert kind is StoreError and "tile (2, 6)" in message and "translate --force" in message
    assert not canvas_processes(tmp_path)


def test_level0_overlays_the_source_slide(tmp_path, cmu1):
    import tiffslide

    # Tiles at 1 µm/px (half the slide's resolution), resampled back onto level 0.
    small = cv2.resize(cmu1, (1110, 1484), interpolation=cv2.INTER_AREA)
    lay = _layout(small, 256, 0, 16, mpp=0.998)
    store = _store(tmp_path / "s.zarr", small, lay)
    res = stitch_store(store, tmp_path / "l0.ome.tif", options=PyramidOptions(),
                       background=BG, name="CMU-1", annotations={},
                       overlay=Overlay(2220, 2967, 0.499))
    slide = tiffslide.TiffSlide(res.path)
    assert slide.dimensions == (2220, 2967)
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499, rel=0.01)
    back = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    blurred = cv2.resize(small, (2220, 2967), interpolation=cv2.INTER_LINEAR)
    assert cv2.PSNR(back, blurred) > 30  # registered: no shift, only the resampling differs


# --- the command --------------------------------------------------------------------------
def _tiled_workspace(cli, ws: Path, *extra: object) -> SlideRecord:
    assert cli("tile", CMU1, "-w", ws, "--target-mpp", "0.499", "--tile-size", "256",
               *extra).exit_code == 0
    from stainctl.workspace import Workspace

    w = Workspace.open(ws)
    slide = w.manifest.slides()[0]
    w.close()
    return slide


def _translate_identity(ws_path: Path, marker: str, cmu1: np.ndarray, *, finish: bool = True):
    """What `translate` will do, with the identity as the model: fill the store of every
    tissue tile of the slide."""
    from stainctl.workspace import Workspace

    ws = Workspace.open(ws_path)
    slide = ws.manifest.slides()[0]
    store = create_for_slide(ws, slide, marker, 16, {"model": "identity", "background": BG})
    rows = ws.manifest.db.execute(
        "SELECT col, row FROM tiles WHERE slide_id=? AND in_tissue=1", (slide.id,))
    for col, row in rows:
        store.write(col, row, _crop(cmu1, *store.layout.origin(col, row), store.layout.side))
    if finish:
        store.finish()
    ws.close()
    return store


def test_stitch_command_writes_records_and_skips(cli, tmp_path, cmu1):
    import openslide

    ws = tmp_path / "ws"
    _tiled_workspace(cli, ws)
    store = _translate_identity(ws, "he", cmu1)
    r = cli("stitch", "-w", ws, "--format", "tiff", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["slides"][0]
    assert out["state"] == "done"
    path = Path(out["details"]["output"])
    assert path == ws.resolve() / "outputs" / "CMU-1-Small-Region.he.tif"
    assert path.with_suffix(".png").exists()
    slide = openslide.OpenSlide(path)
    assert slide.level_count > 2
    back = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    # Tissue tiles are the slide where all their neighbours are tissue too; glass tiles were
    # never translated and read as the background colour.
    lay, written = store.layout, store.written()
    full = written.copy()
    full[1:-1, 1:-1] = cv2.erode(written.astype(np.uint8), np.ones((3, 3), np.uint8))[1:-1, 1:-1]
    inner = np.kron(full, np.ones((lay.stride, lay.stride), bool))[:lay.height, :lay.width]
    assert inner.mean() > 0.2
    assert cv2.PSNR(back[inner][:, None], cmu1[inner][:, None]) > 35
    glass = np.kron(~written, np.ones((lay.stride, lay.stride), bool))[:lay.height, :lay.width]
    glass = cv2.erode(glass.astype(np.uint8), np.ones((80, 80), np.uint8)).astype(bool)
    error = np.abs(back[glass].astype(int) - BG)
    assert glass.mean() > 0.1 and np.percentile(error, 99) <= 2  # JPEG error only

    db = sqlite3.connect(ws / "manifest.sqlite")
    kinds = dict(db.execute("SELECT path, kind FROM artifacts"))
    assert kinds["outputs/CMU-1-Small-Region.he.tif"] == "stitched"
    assert kinds["slides/CMU-1-Small-Region/translated/he.zarr"] == "tile_store"
    status = json.loads(cli("status", "-w", ws, "--json").stdout)["slides"][0]
    assert status["steps"]["stitch:he"] == "done" and status["last_done"] == "stitch:he"

    again = json.loads(cli("stitch", "-w", ws, "--format", "tiff", "--json").stdout)
    assert again["slides"][0]["state"] == "skipped"
    other = json.loads(cli("stitch", "-w", ws, "--json", "-o", tmp_path / "o").stdout)
    assert other["slides"][0]["state"] == "done"
    assert (tmp_path / "o" / "CMU-1-Small-Region.he.ome.tiff").exists()


def test_stitch_lists_the_stores_tiles_once(cli, tmp_path, cmu1, monkeypatch):
    """The plan, the stitch and the canvas child each listed the store's chunk files (a stat
    per tile: slow on a network filesystem); the plan's list now travels with the work, and
    the child receives it from the stitch process."""
    ws = tmp_path / "ws"
    _tiled_workspace(cli, ws)
    _translate_identity(ws, "he", cmu1)
    calls: list[int] = []
    real = TileStore.written
    monkeypatch.setattr(TileStore, "written", lambda self: calls.append(1) or real(self))
    assert cli("stitch", "-w", ws).exit_code == 0
    assert len(calls) == 1


def test_stitch_refuses_incomplete_tiles_and_bad_options(cli, tmp_path, cmu1):
    ws = tmp_path / "ws"
    _tiled_workspace(cli, ws)
    r = cli("stitch", "-w", ws)
    assert r.exit_code == 2 and "run `stainctl translate" in r.stderr
    _translate_identity(ws, "ck7", cmu1, finish=False)
    _translate_identity(ws, "he", cmu1)
    r = cli("stitch", "-w", ws, "--json")
    assert r.exit_code == 1  # one output failed, the other was made
    states = {s["message"].split(":")[0]: s["state"] for s in json.loads(r.stdout)["slides"]}
    assert states == {"ck7": "failed", "he": "done"}
    assert "incomplete" in r.stdout and "run `stainctl translate` again" in r.stdout
    assert not (ws / "outputs" / "CMU-1-Small-Region.ck7.ome.tiff").exists()
    assert (ws / "outputs" / "CMU-1-Small-Region.he.ome.tiff").exists()
    r = cli("stitch", "-w", ws, "-o", tmp_path / "one.tif")
    assert r.exit_code == 2 and "names one file" in r.stderr
    assert cli("stitch", "-w", ws, "--compression", "zstd").exit_code == 2
    assert cli("stitch", "-w", ws, "--background", "1,2").exit_code == 2
    assert cli("stitch", "-w", ws, "--marker", "ki67").exit_code == 2


@pytest.mark.slow
def test_killed_stitch_leaves_no_output_and_reruns(cli, tmp_path, cmu1, cmu1_path):
    ws = tmp_path / "ws"
    # A 0.125 µm/px grid makes an ~9k x 12k canvas: a stitch of a few seconds.
    r = cli("tile", cmu1_path, "-w", ws, "--target-mpp", "0.125", "--min-tissue", "0")
    assert r.exit_code == 0
    from stainctl.workspace import Workspace

    w = Workspace.open(ws)
    store = create_for_slide(w, w.manifest.slides()[0], "he", 32, {"model": "identity"})
    lay = store.layout
    for r in range(lay.rows):
        for c in range(lay.cols):
            y, x = (r * 97) % (cmu1.shape[0] - lay.side), (c * 89) % (cmu1.shape[1] - lay.side)
            store.write(c, r, np.ascontiguousarray(cmu1[y:y + lay.side, x:x + lay.side]))
    store.finish()
    w.close()

    final = ws / "outputs" / "CMU-1-Small-Region.he.ome.tiff"
    proc = subprocess.Popen([sys.executable, "-m", "stainctl", "stitch", "-w", str(ws), "-q"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if list(final.parent.glob(".*tmp-*")):
            break
        time.sleep(0.005)
    time.sleep(0.3)
    assert proc.poll() is None, "the kill should land mid-stitch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(final.parent.glob(".*tmp-*")) and not final.exists()

    r = cli("stitch", "-w", ws, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["slides"][0]["state"] == "done"
    assert final.exists() and not list(final.parent.glob(".*tmp-*"))


def test_level0_from_the_command_and_a_full_disk(cli, tmp_path, cmu1, monkeypatch):
    import tiffslide

    ws = tmp_path / "ws"
    _tiled_workspace(cli, ws)
    _translate_identity(ws, "he", cmu1)
    out = tmp_path / "he-l0.ome.tif"
    assert cli("stitch", "-w", ws, "--level0", "-o", out).exit_code == 0
    assert tiffslide.TiffSlide(out).dimensions == (2220, 2967)

    import pyvips
    import tifffile

    def full(image, path, *args, **kwargs):  # libvips had begun the file when the disk filled
        Path(path).write_bytes(b"II*\0")
        raise pyvips.Error("unable to call tiffsave", "TIFFWrite: No space left on device")

    writes = tifffile.FileHandle.write

    def fills_up(self, data):  # the disk fills in the middle of level 0's tiles
        fills_up.calls += 1
        if fills_up.calls > 12:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return writes(self, data)

    fills_up.calls = 0
    # Both writers: stainctl's own (the model's resolution) and libvips (--level0); each
    # message names the output, not its temporary.
    final = ws / "outputs" / "CMU-1-Small-Region.he.ome.tiff"
    for extra, target, name, fake in (([], tifffile.FileHandle, "write", fills_up),
                                      (["--level0", "-o", out], pyvips.Image, "tiffsave", full)):
        with monkeypatch.context() as m:
            m.setattr(target, name, fake, raising=False)
            r = cli("stitch", "-w", ws, "--force", "--json", *extra)
        assert r.exit_code == 1
        message = json.loads(r.stdout)["slides"][0]["message"]
        assert "disk full" in message
        assert str(out if extra else final) in message and ".tmp-" not in message
        assert not list((ws / "outputs").glob(".*tmp-*")) and not list(tmp_path.glob(".*tmp-*"))
    assert fills_up.calls > 12
