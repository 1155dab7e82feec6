"""Benchmark: `stainctl readout` (with nuclei) on a gigapixel slide of real IHC tissue.

Builds pyramidal TIFFs at 0.2271 µm/px by mosaicking the OS-2 Ki67 crop (Hamamatsu scan, OpenSlide
test data, ../shared/data) with its mirror images, JPEG Q90, 512-px tiles, with pyvips: a small
one and a large one (default 8,000^2 and 32,000^2 px, 0.064 and 1.02 gigapixels). Then, the slide
in the page cache, in interleaved rounds (medians reported):
  * readout: the real CLI (`stainctl readout SLIDE --marker ki67`, nuclei counted) in a
    subprocess, timed, with its peak RSS, on both slides (peak RSS should not grow with area);
  * the same without nuclei (`--marker her2`: DAB area and H-score only), for reference;
  * the tile-read floor: the very tiles readout measured (from its GeoJSON), read with the same
    margin and resized to the same resolution by the same function, in the same order and
    reading conditions, on as many threads, nothing measured, in this process (the target's
    reference); and the same in a process of its own, start-up included, for reference.
Target (issue 20): readout's tiles/s within 2x of the floor's; peak RSS flat with slide area.
Adds a subsection to the readout section of bench/RESULTS.md.

    python bench/readout.py [--small 8000] [--large 32000] [--workers 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import ROOT, add_to_results, run_cli

IHC = ROOT.parent / "shared" / "data" / "tiles" / "ihc" / "OS-2-ndpi_Ki67.ome.tif"
MPP = 0.2271


def build_ihc_slide(path: Path, side: int) -> None:
    import pyvips
    import tifffile

    rgb = tifffile.imread(IHC)[..., :3]
    block = np.vstack([np.hstack([rgb, rgb[:, ::-1]]), np.hstack([rgb[::-1], rgb[::-1, ::-1]])])
    img = pyvips.Image.new_from_array(np.ascontiguousarray(block), interpretation="srgb")
    img = img.replicate(-(-side // img.width), -(-side // img.height)).crop(0, 0, side, side)
    tmp = path.with_suffix(".tmp.tif")
    img.tiffsave(str(tmp), tile=True, tile_width=512, tile_height=512, pyramid=True,
                 compression="jpeg", Q=90, xres=1000 / MPP, yres=1000 / MPP, bigtiff=True)
    os.replace(tmp, path)


def read_floor(slide_path: Path, out: Path, name: str, workers: int) -> tuple[float, int]:
    """Seconds to read the tiles readout measured (its GeoJSON) exactly as it reads them: in
    its order (strips), under its reading conditions (OpenCV on the calling threads, the
    decoded-tile cache cut to a strip's), on as many threads."""
    from stainctl.slide.grid import GridParams, make_grid
    from stainctl.slide.reader import open_slide
    from stainctl.steps.readout import (
        MARGIN_UM,
        ReadoutOptions,
        _read_tile,
        opencv_on_calling_thread,
        strip_cache,
        strip_order,
    )

    doc = json.loads((out / f"{name}.geojson").read_text())
    coords = [tuple(f["geometry"]["coordinates"][0][0]) for f in doc["features"]]
    opts = ReadoutOptions(marker="ki67", nuclear=True, out=out)
    slide = open_slide(slide_path)
    try:
        w0, h0 = slide.dimensions
        grid = make_grid(w0, h0, slide.require_mpp(),
                         GridParams(target_mpp=opts.target_mpp, tile_size=opts.tile_size),
                         slide.level_downsamples)
        margin = max(1, round(MARGIN_UM / grid.mpp))
        level = slide.best_level(grid.extent0 / opts.tile_size)
        ds = slide.level_downsamples[level]
        by_index = {round(y / grid.stride0) * grid.cols + round(x / grid.stride0): (x, y)
                    for x, y in coords}
        order = [by_index[int(i)] for i in strip_order(list(by_index), grid.cols)]

        def read(xy: tuple[int, int]) -> int:
            rgb, _ = _read_tile(slide, int(xy[0]), int(xy[1]), grid.extent0, opts.tile_size,
                                margin, level, ds, w0, h0)
            return int(rgb[0, 0, 0])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool, opencv_on_calling_thread(), \
                strip_cache(slide, level, grid, opts.tile_size, margin):
            list(pool.map(read, order))
        return time.perf_counter() - t0, len(coords)
    finally:
        slide.close()


def process_floor(slide_path: Path, out: Path, name: str, workers: int) -> float:
    """Seconds of a whole process that reads the same tiles as `read_floor` (interpreter
    start, the reader's imports, the slide opened): the floor with a process's start-up, as
    the readout CLI has its own (reported beside, not the target's reference)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--floor-of", str(slide_path), str(out), name,
                    str(workers)], check=True)
    return time.perf_counter() - t0


def bench_slide(work: Path, side: int) -> Path:
    """The bench's slide of `side`^2 px in `work`, built when missing."""
    path = work / f"ihc_mosaic_{side}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        build_ihc_slide(path, side)
        print(f"built {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    return path


def rss_sweep(sides: list[int], work: Path, workers: int) -> None:
    """Peak RSS of readout with nuclei against the slide's area, two runs a size."""
    for side in sides:
        path, out = bench_slide(work, side), work / f"rss_{side}"
        for run in range(2):
            shutil.rmtree(out, ignore_errors=True)
            t, rss = run_cli(["readout", str(path), "--marker", "ki67", "-o", str(out),
                              "--workers", str(workers)])
            doc = json.loads((out / f"{path.stem}.geojson").read_text())
            print(f"{side}^2, run {run + 1}: {len(doc['features'])} tiles, {t:.1f} s, "
                  f"peak RSS {rss:.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=8_000)
    ap.add_argument("--large", type=int, default=32_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--rss-sweep", metavar="SIDES",
                    help="instead: peak RSS and time of readout (Ki67) on slides of these sides, "
                         "e.g. 8000,16000,32000,64000, two runs each (nothing recorded)")
    ap.add_argument("--floor-of", nargs=4, metavar=("SLIDE", "OUT", "NAME", "WORKERS"),
                    help=argparse.SUPPRESS)  # process_floor's child
    args = ap.parse_args()
    if args.floor_of:
        slide, out, name, workers = args.floor_of
        read_floor(Path(slide), Path(out), name, int(workers))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.rss_sweep:
        rss_sweep([int(v) for v in args.rss_sweep.split(",")], args.work, args.workers)
        return
    slides = {side: bench_slide(args.work, side) for side in (args.small, args.large)}
    rows: dict[str, list[float]] = {}
    tiles: dict[int, int] = {}
    for r in range(args.rounds):
        for side, path in slides.items():
            out = args.work / f"readout_{side}"
            for marker, key in (("ki67", "nuclei"), ("her2", "area")):
                shutil.rmtree(out, ignore_errors=True)
                t, rss = run_cli(["readout", str(path), "--marker", marker, "-o", str(out),
                                  "--workers", str(args.workers)])
                rows.setdefault(f"{side}_{key}_s", []).append(t)
                rows.setdefault(f"{side}_{key}_rss", []).append(rss)
            # The tiles of the last (her2) run are the same grid: the floor reads them.
            t, n = read_floor(path, out, path.stem, args.workers)
            tiles[side] = n
            rows.setdefault(f"{side}_floor_s", []).append(t)
            rows.setdefault(f"{side}_process_floor_s", []).append(
                process_floor(path, out, path.stem, args.workers))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    big, small = args.large, args.small
    result = {
        "workers": args.workers, "rounds": args.rounds,
        "large": f"{big}x{big} px at {MPP} µm/px ({big * big / 1e9:.2f} Gpx)",
        "tiles_large": tiles[big], "tiles_small": tiles[small],
        "readout_nuclei_tiles_per_s": round(tiles[big] / med[f"{big}_nuclei_s"], 1),
        "readout_area_only_tiles_per_s": round(tiles[big] / med[f"{big}_area_s"], 1),
        "read_floor_tiles_per_s": round(tiles[big] / med[f"{big}_floor_s"], 1),
        "process_floor_tiles_per_s": round(tiles[big] / med[f"{big}_process_floor_s"], 1),
        "ratio_nuclei_to_floor": round(med[f"{big}_nuclei_s"] / med[f"{big}_floor_s"], 2),
        "ratio_nuclei_to_floor_rounds": [round(a / b, 2) for a, b in zip(
            rows[f"{big}_nuclei_s"], rows[f"{big}_floor_s"], strict=True)],
        "ratio_area_to_floor": round(med[f"{big}_area_s"] / med[f"{big}_floor_s"], 2),
        "ratio_nuclei_to_process_floor": round(
            med[f"{big}_nuclei_s"] / med[f"{big}_process_floor_s"], 2),
        "peak_rss_mb_small": round(med[f"{small}_nuclei_rss"]),
        "peak_rss_mb_large": round(med[f"{big}_nuclei_rss"]),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if not args.no_record:
        _record(result, args)


def _record(res: dict[str, object], args: argparse.Namespace) -> None:
    cmd = (f"python bench/readout.py --small {args.small} --large {args.large} "
           f"--workers {args.workers} --rounds {args.rounds}")
    text = f"""
### readout with nuclei (issue 20): `{cmd}`

Slide: {res["large"]}, the OS-2 Ki67 crop (Hamamatsu) mosaicked with flips, JPEG Q90, 512-px
tiles; readout at 0.5 µm/px, 512-px tiles with a 16 µm margin; {res["workers"]} threads,
{res["cores"]} cores ({res["cpu"]}), medians of {res["rounds"]} rounds, slide in the page cache.

| | tiles/s |
|---|---|
| readout, Ki67 (nuclei counted), whole CLI process | {res["readout_nuclei_tiles_per_s"]} |
| readout, HER2 (DAB area, H-score), whole CLI process | {res["readout_area_only_tiles_per_s"]} |
| read floor: the same {res["tiles_large"]} tiles read, resized | {res["read_floor_tiles_per_s"]} |
| the same, in a process of its own (start-up and imports counted) | \
{res["process_floor_tiles_per_s"]} |

Readout with nuclei takes {res["ratio_nuclei_to_floor"]}x the read floor's time (target 2x; per
round {res["ratio_nuclei_to_floor_rounds"]}), {res["ratio_nuclei_to_process_floor"]}x the
whole-process floor's; without nuclei {res["ratio_area_to_floor"]}x.
Peak RSS of the readout process: {res["peak_rss_mb_small"]} MB on the {args.small}^2 slide
({res["tiles_small"]} tiles), {res["peak_rss_mb_large"]} MB on the {args.large}^2 one.
"""
    add_to_results("readout with nuclei (issue 20)", text)


if __name__ == "__main__":
    main()
