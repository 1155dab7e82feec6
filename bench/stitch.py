"""Benchmark: `stainctl stitch` of a gigapixel tile store, against libvips' own floor.

Builds a ~40k x 30k slide at 0.5 µm/px from real tissue (the CMU-1 mosaic of bench/_common.py),
tiles it with `stainctl tile` (512-px grid tiles), and fills a tile store as `translate` would, with
32 px of context on each side (a 64-px overlap between neighbours) and the slide's own pixels as the
"translation". Then, in this one script:
  * floor: pyvips writes the same raster from an in-memory image (the fastest libvips can write
    this pyramid: no tiles to read, no blending), in a subprocess that builds the raster once and
    saves it once per round (its own peak RSS is reported);
  * streamed floor: the same raster streamed into libvips through stainctl's source
    (`stainctl.stitch.stream.BlockSource`, the path `stitch --level0` takes), by the same
    subprocess: what streaming into libvips costs, with no tiles to read or blend;
  * stainctl: the real CLI (`stitch --force`: the canvas child and stainctl's own pyramid
    writer, docs/adr/0004), one subprocess per round, with its peak RSS.
Both write OME-TIFF, pyramid in SubIFDs, JPEG Q90, 512-px tiles. The three alternate round by round
(stitch, floor, streamed, stitch, ...), after one untimed stitch that puts the store in the page
cache, so that a change in the machine's load hits both; figures are medians over the rounds with
their spread, the ratio is that of the medians (each round's own ratio is listed too). Wall and
CPU seconds are both reported: on two cores the encoder keeps both busy, so the canvas' CPU adds
to the encoding's. The slide is then built again at twice the area and stitched once, to
show RSS does not grow. Target (issue 21): within 1.2x of the floor, peak RSS flat in the area.

    python bench/stitch.py [--width 40000 --height 30000] [--rounds 3] [--no-double]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import ROOT, build_slide, mosaic_block, peak_rss_mb, run_cli

OPTIONS = dict(tile=True, tile_width=512, tile_height=512, pyramid=True, subifd=True,
               bigtiff=True, compression="jpeg", Q=90, xres=2000.0, yres=2000.0, resunit="cm")


def crop(block: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """A crop of the infinitely repeated block, matching the slide `build_slide` wrote."""
    bh, bw = block.shape[:2]
    return block[np.ix_((np.arange(y, y + side) % bh), (np.arange(x, x + side) % bw))]


def mosaic(width: int, height: int) -> np.ndarray:
    block = mosaic_block()
    reps = (-(-height // block.shape[0]), -(-width // block.shape[1]), 1)
    return np.ascontiguousarray(np.tile(block, reps)[:height, :width])


def prepare(work: Path, width: int, height: int) -> Path:
    """Slide, tiled workspace and full tile store; returns the workspace."""
    slide = work / f"mosaic_{width}x{height}.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        build_slide(slide, width, height)
        print(f"built {slide.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    ws = work / f"stitch_ws_{width}x{height}"
    if (ws / "ready").exists():
        return ws
    shutil.rmtree(ws, ignore_errors=True)
    run_cli(["tile", str(slide), "-w", str(ws), "--min-tissue", "0"])

    from stainctl.workspace import Workspace
    from stainctl.workspace.tilestore import create_for_slide

    w = Workspace.open(ws)
    store = create_for_slide(w, w.manifest.slides()[0], "bench", 32, {"model": "identity"})
    lay = store.layout
    block = mosaic_block()
    t0 = time.perf_counter()

    def write(row: int) -> None:
        for col in range(lay.cols):
            x, y = lay.origin(col, row)
            # Outside the slide a scanner sees glass; the tiles carry the mosaic there, which the
            # stitch crops away.
            store.write(col, row, np.ascontiguousarray(crop(block, x, y, lay.side)))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write, range(lay.rows)))
    store.finish()
    w.close()
    print(f"tile store {lay.cols}x{lay.rows} tiles of {lay.side} px written in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    (ws / "ready").touch()
    return ws


def floor(width: int, height: int, out: Path) -> None:
    """Subprocess body: build the raster once, then save it once per line read on stdin: from
    memory ("memory", to `out`) or through stainctl's block source in 512-row blocks
    ("streamed", beside it), printing each save's wall and CPU seconds and this process's peak
    RSS as JSON."""
    import pyvips

    from stainctl.stitch.stream import BlockSource

    canvas = mosaic(width, height)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        streamed = line.strip() == "streamed"
        c0, t0 = _cpu(), time.perf_counter()
        if streamed:
            blocks = (canvas[y:y + 512] for y in range(0, height, 512))
            source = BlockSource(width, height, blocks)
            image = source.image()
        else:
            image = pyvips.Image.new_from_memory(canvas.data, width, height, 3, "uchar")
        image.tiffsave(str(streamed_path(out) if streamed else out), **OPTIONS)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        rss = peak_rss_mb()
        print(json.dumps({"seconds": seconds, "cpu_s": cpu, "rss_mb": rss}), flush=True)


def streamed_path(out: Path) -> Path:
    return out.with_name("floor-streamed.ome.tif")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stitch_once(ws: Path) -> dict[str, float]:
    """One `stainctl stitch --force` process: wall and CPU seconds, its own peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, rss = run_cli(["stitch", "-w", str(ws), "--force"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": seconds, "cpu_s": cpu, "rss_mb": rss}


class Floor:
    """The floor's subprocess: the raster is built once, each `save()` is one timed save."""

    def __init__(self, width: int, height: int, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--width", str(width), "--height", str(height),
             "--floor", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._line()  # the raster is built

    def _line(self) -> dict[str, float]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the floor's subprocess failed")
        return dict(json.loads(line))

    def save(self, how: str = "memory") -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(how + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def psnr_between(a: Path, b: Path, width: int, height: int) -> float:
    """PSNR of the two outputs' level 0 over a few 2k x 2k regions."""
    import cv2
    import tiffslide

    sa, sb = tiffslide.TiffSlide(a), tiffslide.TiffSlide(b)
    values = []
    for x, y in [(0, 0), (width // 2, height // 3), (width - 2048, height - 2048)]:
        ra = np.asarray(sa.read_region((x, y), 0, (2048, 2048)).convert("RGB"))
        rb = np.asarray(sb.read_region((x, y), 0, (2048, 2048)).convert("RGB"))
        values.append(cv2.PSNR(ra, rb))
    return min(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=40_000)
    ap.add_argument("--height", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved stitch/floor rounds")
    ap.add_argument("--no-double", action="store_true", help="skip the twice-the-area run")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        floor(args.width, args.height, args.floor)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    w, h = args.width, args.height
    gp = w * h / 1e9

    ws = prepare(args.work, w, h)
    floor_out = args.work / "floor.ome.tif"
    fl = Floor(w, h, floor_out)
    stitch_once(ws)  # untimed: the store's chunk files into the page cache
    runs: list[tuple[dict[str, float], dict[str, float]]] = []
    streams: list[dict[str, float]] = []
    for r in range(args.rounds):
        a, b, c = stitch_once(ws), fl.save(), fl.save("streamed")
        runs.append((a, b))
        streams.append(c)
        print(f"round {r + 1}: stitch {a['seconds']:.2f} s ({a['cpu_s']:.1f} s CPU), floor "
              f"{b['seconds']:.2f} s ({b['cpu_s']:.1f} s CPU), streamed floor "
              f"{c['seconds']:.2f} s ({c['cpu_s']:.1f} s CPU)", flush=True)
    fl.close()
    st_s, fl_s = [a["seconds"] for a, _ in runs], [b["seconds"] for _, b in runs]
    sf_s = [c["seconds"] for c in streams]
    (output,) = (ws / "outputs").glob("*.ome.tiff")
    result = {
        "slide": f"{w}x{h} px at 0.5 µm/px ({gp:.2f} gigapixel), OME-TIFF SubIFDs, JPEG Q90",
        "rounds": args.rounds,
        "stitch_s": summary(st_s),
        "stitch_s_per_gigapixel": round(statistics.median(st_s) / gp, 2),
        "stitch_cpu_s": summary([a["cpu_s"] for a, _ in runs]),
        "stitch_peak_rss_mb": round(max(a["rss_mb"] for a, _ in runs)),
        "floor_s": summary(fl_s),
        "floor_s_per_gigapixel": round(statistics.median(fl_s) / gp, 2),
        "floor_cpu_s": summary([b["cpu_s"] for _, b in runs]),
        "floor_peak_rss_mb": round(max(b["rss_mb"] for _, b in runs)),
        "ratio_vs_floor": round(statistics.median(st_s) / statistics.median(fl_s), 2),
        "streamed_floor_s": summary(sf_s),
        "streamed_floor_cpu_s": summary([c["cpu_s"] for c in streams]),
        "ratio_streamed_vs_floor": round(statistics.median(sf_s) / statistics.median(fl_s), 2),
        "ratio_vs_streamed_floor": round(statistics.median(st_s) / statistics.median(sf_s), 2),
        "ratio_per_round": [round(a / b, 2) for a, b in zip(st_s, fl_s, strict=True)],
        "psnr_stitch_vs_floor_db": round(psnr_between(output, floor_out, w, h), 1),
    }
    floor_out.unlink()
    streamed_path(floor_out).unlink()
    if not args.no_double:
        ws2 = prepare(args.work, w, 2 * h)
        d = stitch_once(ws2)
        result.update({
            "double_area": f"{w}x{2 * h} px", "double_stitch_s": round(d["seconds"], 2),
            "double_s_per_gigapixel": round(d["seconds"] / (2 * gp), 2),
            "double_peak_rss_mb": round(d["rss_mb"]),
        })
    result.update({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
