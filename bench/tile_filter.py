"""Benchmark: `stainctl tile` + `filter` on a gigapixel slide, against hs2p and raw decoding.

Builds a ~40k x 30k pyramidal TIFF at 0.5 µm/px from real tissue (the CMU-1 sample, mosaicked with
flips so neighbours differ) with pyvips, JPEG Q90, 512-px tiles. Then, in this one script, in
interleaved rounds (medians reported), all with the slide in the page cache:
  * hs2p 6.1.0: its tissue coordinates, then every tile read at full resolution (libvips backend),
    one whole process run by `--hs2p-python` (a separate environment: hs2p is not a stainctl
    dependency; see bench/RESULTS.md for how it was installed);
  * stainctl: the real CLI (`tile`, then `filter`) in subprocesses, timed, with their peak RSS;
    and `filter` again with STAINCTL_DIRECT_READ=0 (OpenSlide reads every tile) for reference;
  * raw: the bytes of stainctl's tissue tiles read and decoded by tifffile/imagecodecs on as many
    threads as stainctl gets, with and without the three filter metrics, in this process.
Targets (issue 21): stainctl tile + filter >= 1.5x hs2p's tiles/s, and <= 1.3x the raw
decode + metrics time of the same tiles plus 1 s of process start-up; peak RSS < 1 GB.

    python bench/tile_filter.py [--width 40000 --height 30000] [--workers 2] [--rounds 3] \
        [--hs2p-python bench/_work/hs2p-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, build_slide, run_cli


def raw_decode(path: Path, coords: list[tuple[int, int]], workers: int,
               metrics: bool) -> float:
    """Seconds to read (pread) and decode the JPEG tiles at `coords`, with the filter metrics
    of each when `metrics`, on `workers` threads: the floor for what `filter` does."""
    import tifffile

    from stainctl.quality.metrics import tile_metrics

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        index = [(y // page.tilelength) * per_row + x // page.tilewidth for x, y in coords]
        offsets, counts = page.dataoffsets, page.databytecounts
        decode, tables = page.decode, page.jpegtables
        fd = os.open(path, os.O_RDONLY)

        def work(chunk: list[int]) -> int:
            for i in chunk:
                tile = decode(os.pread(fd, counts[i], offsets[i]), i, jpegtables=tables)[0][0]
                if metrics:
                    tile_metrics(tile)
            return len(chunk)

        chunks = [index[i::workers] for i in range(workers)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            assert sum(pool.map(work, chunks)) == len(coords)
        elapsed = time.perf_counter() - t0
        os.close(fd)
    return elapsed


def run_hs2p(python: str, slide: Path, workers: int) -> tuple[float, float, dict[str, object]]:
    """hs2p in its own environment, one whole process: (seconds, peak RSS MB, its report)."""
    script = Path(__file__).with_name("_hs2p_tiles.py")
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, str(script), str(slide), str(workers), "vips", "512", "0.5"],
                            stdout=subprocess.PIPE, cwd=slide.parent)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hs2p failed ({python})")
    return elapsed, usage.ru_maxrss / 1024, json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=40_000)
    ap.add_argument("--height", type=int, default=30_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hs2p-python", default=str(ROOT / "bench/_work/hs2p-venv/bin/python"),
                    help="an interpreter with hs2p[openslide,vips,tifffile]==6.1.0; '' skips it")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    slide = args.work / f"mosaic_{args.width}x{args.height}.tif"
    if not slide.exists():
        t0 = time.perf_counter()
        build_slide(slide, args.width, args.height)
        print(f"built {slide.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    ws = args.work / "ws"
    if ws.exists():
        import shutil

        shutil.rmtree(ws)

    import sqlite3

    rows: dict[str, list[float]] = {k: [] for k in (
        "hs2p_s", "hs2p_rss", "tile_s", "filter_s", "tile_rss", "filter_rss", "filter_openslide_s",
        "raw_decode_metrics_s", "raw_decode_s")}
    hs2p_report: dict[str, object] = {}
    coords: list[tuple[int, int]] = []
    total = 0
    for r in range(args.rounds):
        if args.hs2p_python:
            t, rss, hs2p_report = run_hs2p(args.hs2p_python, slide, args.workers)
            rows["hs2p_s"].append(t)
            rows["hs2p_rss"].append(rss)
        force = ["--force"] if r else []
        t, rss = run_cli(["tile", str(slide), "-w", str(ws), *force])
        rows["tile_s"].append(t)
        rows["tile_rss"].append(rss)
        t, rss = run_cli(["filter", "-w", str(ws), "--workers", str(args.workers), "--force"])
        rows["filter_s"].append(t)
        rows["filter_rss"].append(rss)
        os.environ["STAINCTL_DIRECT_READ"] = "0"
        try:
            t, _ = run_cli(["filter", "-w", str(ws), "--workers", str(args.workers), "--force"])
        finally:
            del os.environ["STAINCTL_DIRECT_READ"]
        rows["filter_openslide_s"].append(t)
        if not coords:
            db = sqlite3.connect(ws / "manifest.sqlite")
            coords = [(x, y) for x, y in db.execute("SELECT x, y FROM tiles WHERE in_tissue=1")]
            total = db.execute("SELECT COUNT(*) FROM tiles").fetchone()[0]
            db.close()
        rows["raw_decode_metrics_s"].append(raw_decode(slide, coords, args.workers, True))
        rows["raw_decode_s"].append(raw_decode(slide, coords, args.workers, False))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items() if v),
              flush=True)

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    n = len(coords)
    ours = med["tile_s"] + med["filter_s"]
    result: dict[str, object] = {
        "slide": f"{args.width}x{args.height} px at 0.5 µm/px, JPEG Q90, 512-px tiles",
        "rounds": args.rounds, "workers": args.workers,
        "tiles_total": total, "tiles_tissue": n,
        "stainctl_tile_s": round(med["tile_s"], 2), "stainctl_filter_s": round(med["filter_s"], 2),
        "stainctl_tiles_per_s": round(n / ours, 1),
        "stainctl_filter_openslide_s": round(med["filter_openslide_s"], 2),
        "raw_decode_metrics_s": round(med["raw_decode_metrics_s"], 2),
        "raw_decode_s": round(med["raw_decode_s"], 2),
        "ratio_vs_raw_decode_metrics_plus_1s": round(ours / (med["raw_decode_metrics_s"] + 1), 2),
        "peak_rss_mb": {"tile": round(max(rows["tile_rss"])),
                        "filter": round(max(rows["filter_rss"]))},
        "bench_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }
    if "hs2p_s" in med:
        tiles = int(hs2p_report["tiles"])  # type: ignore[call-overload]
        result.update({
            "hs2p_tiles": tiles, "hs2p_s": round(med["hs2p_s"], 2),
            "hs2p_tiles_per_s": round(tiles / med["hs2p_s"], 1),
            "hs2p_peak_rss_mb": round(max(rows["hs2p_rss"])), "hs2p_report": hs2p_report,
            "speed_vs_hs2p": round((n / ours) / (tiles / med["hs2p_s"]), 2)})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
