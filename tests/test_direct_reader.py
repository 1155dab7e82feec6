"""The direct tile reader (stainctl.slide.direct) gives the library's pixels, on every slide in
../shared/data that it serves, on stainctl-written pyramids and on Aperio JPEG 2000 and
LZW/deflate TIFFs written here; what it cannot decode goes to the library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from stainctl.errors import SlideError
from stainctl.slide import direct
from stainctl.slide.reader import Slide, open_slide
from stainctl.slide.tiles import read_tile

SLIDES = {  # file -> the levels the direct reader serves
    "wsi/aperio/CMU-1-Small-Region.svs": [0],
    "wsi/hamamatsu/test3-DAPI-2-387.ndpi": [0, 1, 2, 3],  # 4-6 are OpenSlide's scaled decodes
    "tiles/he/OS-1-detail_HE.ome.tif": [0],
    "tiles/ihc/OS-2-ndpi_Ki67.ome.tif": [0],
    "tiles/ihc/OS-2-vsi_Ki67.ome.tif": [0],
}


def _library(path: Path, monkeypatch: pytest.MonkeyPatch) -> Slide:
    with monkeypatch.context() as m:
        m.setenv("STAINCTL_DIRECT_READ", "0")
        slide = open_slide(path)
    assert slide.direct is None
    return slide


def _compare(fast: Slide, ref: Slide, seed: int = 0, regions: int = 12) -> int:
    """Largest difference over random regions (some past the edges, some straddling tiles) at
    every level, at level-0 origins on that level's pixel grid."""
    rng = np.random.default_rng(seed)
    worst = 0
    for level, (w, h) in enumerate(fast.level_dimensions):
        ds = fast.level_downsamples[level]
        for _ in range(regions):
            lx, ly = int(rng.integers(-40, w)), int(rng.integers(-40, h))
            rw, rh = int(rng.integers(1, 800)), int(rng.integers(1, 800))
            x, y = round(lx * ds), round(ly * ds)
            a, b = fast.read_region(x, y, level, rw, rh), ref.read_region(x, y, level, rw, rh)
            assert a.shape == b.shape == (rh, rw, 3) and a.dtype == np.uint8
            worst = max(worst, int(np.abs(a.astype(int) - b.astype(int)).max()))
        whole = fast.read_region(0, 0, level, w, h)
        worst = max(worst, int(np.abs(whole.astype(int)
                                      - ref.read_region(0, 0, level, w, h)).max()))
    return worst


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n.endswith(".ndpi") else n  # ~3 s: 7 levels
    for n in sorted(SLIDES)])
def test_real_slides_read_directly_with_the_library_pixels(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DATA / name
    fast, ref = open_slide(path), _library(path, monkeypatch)
    assert fast.direct is not None and sorted(fast.direct.levels) == SLIDES[name]
    # OpenSlide and imagecodecs decode these JPEG tiles with the same libjpeg-turbo DCT:
    # measured identical, so identical is what is asserted.
    assert _compare(fast, ref) == 0
    fast.close()
    ref.close()


def test_grid_tiles_read_directly_equal_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    path = DATA / "wsi/aperio/CMU-1-Small-Region.svs"
    fast, ref = open_slide(path), _library(path, monkeypatch)
    for x, y in [(0, 0), (512, 1024), (1700, 2500), (-32, -32)]:  # 240-px tiles: straddling
        for extent, size in [(512.0, 512), (576.0, 576), (1024.0, 512)]:
            assert np.array_equal(read_tile(fast, x, y, extent, size),
                                  read_tile(ref, x, y, extent, size))


@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff"])
def test_stainctl_written_pyramid(fmt: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import pyvips

    from stainctl.stitch.pyramid import PyramidOptions, save_pyramid

    src = open_slide(DATA / "wsi/aperio/CMU-1-Small-Region.svs")
    rgb = np.ascontiguousarray(src.read_region(0, 0, 0, 2048, 2048))
    src.close()
    out = tmp_path / f"pyramid.{fmt}.tif"
    image = pyvips.Image.new_from_array(rgb, interpretation="srgb")
    save_pyramid(image, out, 0.5, "stainctl test pyramid",
                 PyramidOptions(format=fmt, compression="jpeg", quality=90, tile=256))
    fast, ref = open_slide(out), _library(out, monkeypatch)
    levels = len(fast.level_dimensions)
    # OpenSlide reads all levels of the pages pyramid, level 0 of the SubIFD one (NOTES.md).
    assert levels == (4 if fmt == "tiff" else 1) and fast.direct is not None
    assert sorted(fast.direct.levels) == list(range(levels))
    assert _compare(fast, ref) == 0


def _write_tiled(path: Path, rgb: np.ndarray, compression: object, description: str | None,
                 tiles: object = None) -> None:
    import tifffile

    data = rgb if tiles is None else tiles
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, shape=rgb.shape, dtype=np.uint8, tile=(256, 256),
                 compression=compression, photometric="rgb", description=description,
                 metadata=None)


def _tissue(h: int = 600, w: int = 700) -> np.ndarray:
    src = open_slide(DATA / "wsi/aperio/CMU-1-Small-Region.svs")
    rgb = np.ascontiguousarray(src.read_region(300, 900, 0, w, h))
    src.close()
    return rgb


@pytest.mark.parametrize("compression", [33003, 33005])
def test_aperio_jpeg2000(compression: int, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Aperio's JPEG 2000 tiles (raw codestreams; 33003 holds YCbCr, which OpenSlide converts
    with its own tables): an SVS is written here tile by tile."""
    import imagecodecs

    rgb = _tissue()
    h, w = rgb.shape[:2]
    stored = rgb
    if compression == 33003:  # full-range YCbCr components, as Aperio stores them
        f = rgb.astype(float)
        ycc = np.stack([0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2],
                        128 - 0.168736 * f[..., 0] - 0.331264 * f[..., 1] + 0.5 * f[..., 2],
                        128 + 0.5 * f[..., 0] - 0.418688 * f[..., 1] - 0.081312 * f[..., 2]], -1)
        stored = np.clip(np.round(ycc), 0, 255).astype(np.uint8)

    def tiles():  # type: ignore[no-untyped-def]
        for ty in range(0, h, 256):
            for tx in range(0, w, 256):
                t = np.zeros((256, 256, 3), np.uint8)
                part = stored[ty:ty + 256, tx:tx + 256]
                t[:part.shape[0], :part.shape[1]] = part
                yield imagecodecs.jpeg2k_encode(t, level=60, codecformat="J2K", mct=False)

    path = tmp_path / "jp2k.svs"
    _write_tiled(path, rgb, compression, f"Aperio Image Library v10.0.0\n{w}x{h} [0,0 {w}x{h}] "
                 "(256x256) J2K|AppMag = 20|MPP = 0.5", tiles())
    fast, ref = open_slide(path), _library(path, monkeypatch)
    assert fast.vendor == "aperio" and fast.direct is not None and list(fast.direct.levels) == [0]
    assert _compare(fast, ref) == 0
    region = fast.read_region(0, 0, 0, w, h)
    assert np.abs(region.astype(int) - rgb).mean() < 8  # and it is the picture, not noise


@pytest.mark.parametrize("compression", ["lzw", "deflate", None])
def test_lossless_generic_tiff(compression: str | None, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = _tissue()
    path = tmp_path / "lossless.tif"
    _write_tiled(path, rgb, compression, None)
    fast, ref = open_slide(path), _library(path, monkeypatch)
    assert fast.direct is not None and list(fast.direct.levels) == [0]
    assert _compare(fast, ref) == 0
    assert np.array_equal(fast.read_region(0, 0, 0, 700, 600), rgb)


def test_what_it_cannot_decode_is_read_by_the_library(tmp_path: Path) -> None:
    import tifffile

    rgba = np.dstack([_tissue(300, 300), np.full((300, 300), 255, np.uint8)])
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, tile=(256, 256), photometric="rgb", extrasamples=[2],
                     metadata=None)
    slide = open_slide(path)
    assert slide.direct is None or not slide.direct.serves(0)
    assert np.array_equal(slide.read_region(0, 0, 0, 300, 300), rgba[..., :3])


def test_an_undecodable_tile_hands_the_level_to_the_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = _tissue()
    path = tmp_path / "lzw.tif"
    _write_tiled(path, rgb, "lzw", None)
    slide = open_slide(path)
    assert slide.direct is not None

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise direct.Unsupported("not this one")

    monkeypatch.setattr(direct, "_decode", refuse)
    assert np.array_equal(slide.read_region(0, 0, 0, 700, 600), rgb)
    assert not slide.direct.serves(0)


def test_a_corrupt_tile_is_a_slide_error(tmp_path: Path) -> None:
    rgb = _tissue()
    path = tmp_path / "broken.tif"
    _write_tiled(path, rgb, "jpeg", None)
    slide = open_slide(path)
    assert slide.direct is not None
    lv = slide.direct.levels[0]
    with open(path, "r+b") as fh:  # garble the middle of the first tile's JPEG data
        fh.seek(int(lv.offsets[0]) + int(lv.counts[0]) // 2)
        fh.write(b"\xff\xd9" * 64)
        fh.truncate(int(lv.offsets[-1]) + 10)  # and cut the last tile short
    with pytest.raises(SlideError, match="truncated or corrupt"):
        slide.read_region(600, 500, 0, 100, 100)


def test_ycbcr_tables_match_openslide_formula() -> None:
    ycc = np.array([[[128, 128, 128], [16, 200, 40], [235, 10, 250]]], np.uint8)
    rgb = direct.ycbcr_to_rgb(ycc).astype(int)
    y, cb, cr = ycc[0].astype(float).T
    expected = np.stack([y + 1.402 * (cr - 128), y - 0.34414 * (cb - 128) - 0.71414 * (cr - 128),
                         y + 1.772 * (cb - 128)], axis=-1).clip(0, 255)
    assert np.abs(rgb[0] - expected).max() <= 1


def test_strip_bytes_covers_the_stored_tiles_a_strip_of_reads_touches() -> None:
    """`strip_bytes` (readout's cache budget) counts the stored tiles under a strip of square
    reads starting anywhere, and the next row's; nothing for a level it does not read."""
    slide = open_slide(DATA / "wsi/aperio/CMU-1-Small-Region.svs")
    assert slide.direct is not None
    lv = slide.direct.levels[0]
    tw, th = lv.tile_width, lv.tile_height  # 240 px
    side, width = 300.0, 1000.0
    budget = slide.direct.strip_bytes(0, width, side)
    assert budget == (-(-1000 // tw) + 1) * (-(-300 // th) + 2) * tw * th * 3
    rng = np.random.default_rng(0)
    for _ in range(50):  # a strip at any offset touches no more tiles than that, less a row
        x, y = int(rng.integers(0, tw)), int(rng.integers(0, th))
        cols = (x + int(width) - 1) // tw - x // tw + 1
        rows = (y + int(side) - 1) // th - y // th + 1
        assert cols * (rows + 1) * tw * th * 3 <= budget
    assert slide.direct.strip_bytes(len(slide.level_dimensions), width, side) is None
    slide.close()
    assert slide.direct is None or slide.direct.strip_bytes(0, width, side) is None


def test_reader_threads_decode_on_their_own_thread(cmu1_path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    """A region touching many stored tiles goes to the shared decode pool only from the main
    thread (thumbnail strips); a reader thread (translate's, embed's) decodes it itself: eight
    readers handing their tiles to the pool's four threads read half as fast."""
    from concurrent.futures import ThreadPoolExecutor

    slide = open_slide(cmu1_path)
    assert slide.direct is not None and slide.direct.serves(0)
    used: list[int] = []
    real = direct._pool

    def counted() -> object:
        used.append(1)
        return real()

    monkeypatch.setattr(direct, "_pool", counted)
    on_main = slide.read_region(100, 100, 0, 600, 600)  # 240-px stored tiles: 4 x 4 of them
    assert used == [1]
    slide.direct.forget()
    with ThreadPoolExecutor(1) as pool:
        on_reader = pool.submit(slide.read_region, 100, 100, 0, 600, 600).result()
    assert used == [1] and np.array_equal(on_reader, on_main)


def test_read_batches_share_each_batch_and_read_a_bounded_way_ahead(cmu1_path) -> None:
    """Batches come in order with the tiles `TileSource.read` gives; the readers share each
    batch, and however many there are, at most AHEAD batches are read beyond the one the
    consumer holds (a thread per batch held readers + 2 batches)."""
    import threading
    import time

    from stainctl.slide.tiles import AHEAD, TileSource, read_batches

    base = TileSource(str(cmu1_path), 256.0, 128)
    coords = np.array([(100 + 70 * i, 200 + 90 * (i % 5)) for i in range(23)], np.int64)
    expected = np.stack([base.read(int(x), int(y)) for x, y in coords])
    reads: list[int] = []
    lock = threading.Lock()

    class Counted(TileSource):
        def read(self, x: int, y: int) -> np.ndarray:
            with lock:
                reads.append(x)
            return super().read(x, y)

    source = Counted(str(cmu1_path), 256.0, 128)
    for readers in (3, 8):
        reads.clear()
        got = []
        for k, batch in enumerate(read_batches(source, coords, 4, readers)):
            time.sleep(0.05)  # a slow consumer: readers run ahead as far as they may
            with lock:
                assert len(reads) <= 4 * (k + 1 + AHEAD)
            got.append(batch)
        assert [len(b) for b in got] == [4, 4, 4, 4, 4, 3]
        assert np.array_equal(np.concatenate(got), expected)
