"""What the benchmarks share: the gigapixel mosaic of real tissue and a timed CLI run."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "stainctl" / "samples" / "CMU-1-Small-Region.svs"
RESULTS = ROOT / "bench" / "RESULTS.md"


def add_to_results(section: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` (a `###` subsection) at the end of the section of `path` whose `## ` heading
    starts with `section`, or under a new such heading at the end: a rerun of a script lands
    beside its earlier runs, not after whichever section happens to be last."""
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = doc.rstrip("\n").split("\n") if doc else []
    body = text.strip("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(f"## {section}")), None)
    if start is None:
        lines += ["", f"## {section}", "", body]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        last = end
        while last > start + 1 and not lines[last - 1].strip():
            last -= 1
        lines = [*lines[:last], "", body, "", *lines[end:]]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, path)


def mosaic_block() -> np.ndarray:
    """A 2x2 block of the CMU-1 sample and its mirror images: repeated, it tiles any area with
    real tissue and no straight repeats at the joins."""
    import openslide

    src = openslide.OpenSlide(str(SAMPLE))
    rgb = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
    block = np.vstack([np.hstack([rgb, rgb[:, ::-1]]), np.hstack([rgb[::-1], rgb[::-1, ::-1]])])
    return np.ascontiguousarray(block)


def build_slide(path: Path, width: int, height: int) -> None:
    """A pyramidal JPEG TIFF (512-px tiles, 0.5 µm/px) of the repeated block: pyvips where it is
    installed, else tifffile + imagecodecs (the GPU machine has no libvips)."""
    try:
        import pyvips
    except ImportError:
        tmp = path.with_suffix(".tmp.tif")
        write_pyramid(tmp, width, height, compression="jpeg")
        os.replace(tmp, path)
        return

    img = pyvips.Image.new_from_array(mosaic_block(), interpretation="srgb")
    img = img.replicate(-(-width // img.width), -(-height // img.height)).crop(0, 0, width, height)
    tmp = path.with_suffix(".tmp.tif")
    # xres/yres are pixels per mm in libvips: 0.5 µm/px = 2000 px/mm.
    img.tiffsave(str(tmp), tile=True, tile_width=512, tile_height=512, pyramid=True,
                 compression="jpeg", Q=90, xres=2000.0, yres=2000.0, bigtiff=True)
    os.replace(tmp, path)


def write_pyramid(path: Path, width: int, height: int, compression: str | None = None) -> None:
    """A tiled pyramidal TIFF (pages, 512-px tiles, 0.5 µm/px, levels 4x apart) of the repeated
    block, written with tifffile alone (no libvips on the GPU machine); uncompressed unless
    `compression` is given."""
    import cv2
    import tifffile

    block = mosaic_block()
    reps = (-(-height // block.shape[0]), -(-width // block.shape[1]), 1)
    level = np.ascontiguousarray(np.tile(block, reps)[:height, :width])
    extra = {"compressionargs": {"level": 90}} if compression == "jpeg" else {}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i in range(4):
            if i:
                level = cv2.resize(level, (level.shape[1] // 4, level.shape[0] // 4),
                                   interpolation=cv2.INTER_AREA)
            px_per_cm = 20000 / 4**i
            tw.write(level, tile=(512, 512), photometric="rgb", compression=compression,
                     subfiletype=1 if i else 0, resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", metadata=None, maxworkers=os.cpu_count(),
                     **extra)
            if min(level.shape[:2]) < 2048:
                break


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: in a child, Linux counts in it the
    peak of the process that started it (a bench that had just built its slides read 358 MB on
    every run, whatever the area). Benchmarks' child processes run this very source
    (PEAK_RSS_SOURCE), so every figure is read one way."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


PEAK_RSS_SOURCE = inspect.getsource(peak_rss_mb)

# Runs stainctl's CLI as `python -m stainctl` does and prints the process's own peak RSS on exit.
_PEAK_RUNNER = PEAK_RSS_SOURCE + """
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write(f'PEAK_RSS_MB {peak_rss_mb()!r}\\n'))
sys.argv[0] = 'stainctl'
runpy.run_module('stainctl', run_name='__main__', alter_sys=True)
"""


def run_cli(args: list[str]) -> tuple[float, float]:
    """Run stainctl in a subprocess; (seconds, its own peak RSS in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_RUNNER, *args, "-q"],
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stainctl {' '.join(args)} failed:\n{proc.stderr}")
    mb = [float(line.split()[1]) for line in proc.stderr.splitlines()
          if line.startswith("PEAK_RSS_MB ")]
    return elapsed, mb[-1]
