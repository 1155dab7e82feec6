"""Benchmark: `stainctl stitch` of a gigapixel tile store, against libvips' own floor.

Builds a ~40k x 30k slide at 0.5 µm/px from real tissue (the CMU-1 mosaic of bench/_common.py),
tiles it with `stainctl tile` (512-px grid tiles), and fills a tile store as `translate` would, with
32 px of context on each side (a 64-px overlap between neighbours) and the slide's own pixels as the
"translation". Then, in this one script:
  * floor: pyvips writes the same raster from an in-memory image (the fastest libvips can write
    this pyramid: no tiles to read, no blending), in a subprocess to see its own peak RSS;
  * stainctl: the real CLI (`stitch --force`) in a subprocess, timed, with its peak RSS.
Both write OME-TIFF, pyramid in SubIFDs, JPEG Q90, 512-px tiles; both are the best of two runs.
The slide is then built again at twice the area and stitched once, to show RSS does not grow.
Target (issue 3): within 1.5x of the floor, peak RSS under 1.5 GB and flat in the slide area.

    python bench/stitch.py [--width 40000 --height 30000] [--no-double]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import ROOT, build_slide, mosaic_block, run_cli

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
    """Subprocess body: time pyvips saving the raster from memory (best of two)."""
    import pyvips

    canvas = mosaic(width, height)
    image = pyvips.Image.new_from_memory(canvas.data, width, height, 3, "uchar")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        image.tiffsave(str(out), **OPTIONS)
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": min(times), "rss_mb": rss}))


def stitch(ws: Path, runs: int) -> tuple[float, float, Path]:
    out = ws / "outputs"
    results = [run_cli(["stitch", "-w", str(ws), "--force"]) for _ in range(runs)]
    (path,) = out.glob("*.ome.tiff")
    return min(t for t, _ in results), max(r for _, r in results), path


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
    t_stitch, rss_stitch, output = stitch(ws, 2)
    floor_out = args.work / "floor.ome.tif"
    proc = subprocess.run([sys.executable, __file__, "--width", str(w), "--height", str(h),
                           "--floor", str(floor_out)], capture_output=True, text=True,
                          check=True)
    fl = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "slide": f"{w}x{h} px at 0.5 µm/px ({gp:.2f} gigapixel), OME-TIFF SubIFDs, JPEG Q90",
        "stitch_s": round(t_stitch, 2), "stitch_s_per_gigapixel": round(t_stitch / gp, 2),
        "stitch_peak_rss_mb": round(rss_stitch),
        "floor_s": round(fl["seconds"], 2), "floor_s_per_gigapixel": round(fl["seconds"] / gp, 2),
        "floor_peak_rss_mb": round(fl["rss_mb"]),
        "ratio_vs_floor": round(t_stitch / fl["seconds"], 2),
        "psnr_stitch_vs_floor_db": round(psnr_between(output, floor_out, w, h), 1),
    }
    floor_out.unlink()
    if not args.no_double:
        ws2 = prepare(args.work, w, 2 * h)
        t2, rss2, _ = stitch(ws2, 1)
        result.update({
            "double_area": f"{w}x{2 * h} px", "double_stitch_s": round(t2, 2),
            "double_s_per_gigapixel": round(t2 / (2 * gp), 2),
            "double_peak_rss_mb": round(rss2),
        })
    result.update({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
