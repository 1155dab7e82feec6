"""Benchmark of `stainctl normalize` (issue 19).

CPU part (default): megapixels/s of `normalize --method macenko` on a slide built from real
tissue (the OS-1 H&E crop mosaicked into a pyramidal TIFF of --gpx gigapixels), next to the floor
of the same tile read + stitch with the identity engine; peak RSS at two slide areas; stainfuser
seconds per 512-px tile with full-size random networks at --steps steps (extrapolated to 20).
GPU part: `python bench/normalize.py --device cuda` (tiles/s of full-size stainfuser in fp16 and
bf16, 20 steps, batch 8; about a minute). Figures are appended to bench/RESULTS.md.

    python bench/normalize.py --gpx 1.0        # CPU: gigapixel slide; several minutes
    python bench/normalize.py --device cuda    # GPU only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PEAK_RSS_SOURCE, add_to_results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OS1 = DATA / "tiles" / "he" / "OS-1-detail_HE.ome.tif"
CMU1 = DATA / "wsi" / "aperio" / "CMU-1-Small-Region.svs"


def mosaic(path: Path, gpx: float, width: int | None = None) -> Path:
    """A pyramidal JPEG TIFF of about `gpx` gigapixels at 0.5 µm/px, tiled from OS-1: square,
    or `width` px wide and as tall as the area needs."""
    import pyvips

    tile = pyvips.Image.new_from_file(str(OS1)).extract_band(0, n=3)
    w = width or int((gpx * 1e9) ** 0.5)
    h = int(gpx * 1e9 / w)
    big = tile.replicate(-(-w // tile.width), -(-h // tile.height)).crop(0, 0, w, h)
    big = big.copy(xres=2000.0, yres=2000.0)  # 0.5 µm/px in px per mm
    big.tiffsave(str(path), tile=True, tile_width=512, tile_height=512, pyramid=True,
                 compression="jpeg", Q=85, resunit="cm")
    return path


def run_job(slide: Path, out: Path, method: str) -> tuple[float, float]:
    """Seconds and peak RSS (MB, `peak_rss_mb`) of one normalize run in a child process."""
    code = PEAK_RSS_SOURCE + f"""
import sys, time
sys.argv = ["stainctl", "normalize", {str(slide)!r}, "--target", {str(CMU1)!r}, "-o",
            {str(out)!r}, "--method", {method!r}, "-q"]
from stainctl.cli.app import main
t = time.perf_counter()
try:
    main()
except SystemExit:
    pass
print("SECONDS", time.perf_counter() - t)
print("RSS", repr(peak_rss_mb()))
"""
    if method == "identity":
        code = code.replace("from stainctl.cli.app import main", (
            # The floor: the same job with the per-slide fit and colour table left out.
            "import stainctl.steps.stain_fit as sf\n"
            "sf.fit_slide = lambda ws, slide, grid, norm, step: "
            "type('T', (), {'apply': staticmethod(lambda t: t)})()\n"
            "from stainctl.cli.app import main")).replace(f"{method!r}", "'macenko'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, check=False)
    seconds = rss = None
    for line in r.stdout.splitlines():
        if line.startswith("SECONDS"):
            seconds = float(line.split()[1])
        if line.startswith("RSS"):
            rss = float(line.split()[1])
    if seconds is None or rss is None:
        raise RuntimeError(r.stderr[-2000:])
    return seconds, rss


def stainfuser_tiles(device: str, dtype: str, steps: int, batch: int) -> float:
    """Seconds per 512-px tile, full-size random networks."""
    import numpy as np
    import torch

    from stainctl.engines.base import EngineOptions
    from stainctl.engines.stainfuser.config import StainFuserConfig
    from stainctl.engines.stainfuser.engine import (
        StainFuserEngine,
        StainFuserParts,
        build_networks,
    )
    from stainctl.models.registry import get_card

    card = get_card("stainfuser")
    config = StainFuserConfig.from_card(card)
    torch.manual_seed(0)
    engine = StainFuserEngine(card, StainFuserParts(config, build_networks(config)),
                              EngineOptions(device=device, dtype=dtype, steps=steps), device)
    rng = np.random.default_rng(0)
    engine.set_reference(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    tiles = rng.integers(0, 255, (batch, 512, 512, 3), dtype=np.uint8)
    engine.translate(tiles[:1], [0])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    engine.translate(tiles, list(range(batch)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / batch


def record(lines: list[str]) -> None:
    add_to_results("normalize (issue 19)", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpx", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2, help="CPU stainfuser steps (extrapolated)")
    p.add_argument("--shape", choices=("square", "tall"), default="square",
                   help="tall: both slides as wide as the small square one, the large one 4x "
                        "taller (peak RSS against the area at a fixed width)")
    p.add_argument("--no-stainfuser", action="store_true", help="skip the stainfuser timing")
    a = p.parse_args()
    cmd = "python bench/normalize.py " + " ".join(sys.argv[1:])
    if a.device.startswith("cuda"):
        out = [f"### normalize: stainfuser on {a.device} (`{cmd}`)", ""]
        for dtype in ("fp16", "bf16"):
            s = stainfuser_tiles(a.device, dtype, 20, 8)
            out.append(f"- {dtype}: {1 / s:.2f} tiles/s (512 px, 20 PNDM steps, batch 8, "
                       "full-size random networks)")
        record(out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        width = int((a.gpx / 4 * 1e9) ** 0.5) if a.shape == "tall" else None
        for gpx in (a.gpx / 4, a.gpx):
            slide = mosaic(Path(tmp) / f"m{gpx}.tif", gpx, width)
            for method in ("identity", "macenko"):
                sec, rss = run_job(slide, Path(tmp) / f"out-{gpx}-{method}", method)
                rows.append((gpx, method, sec, rss))
    out = [f"### `{cmd}` ({time.strftime('%Y-%m-%d')})", "",
           "| slide Gpx | run | s | MP/s | peak RSS MB |", "|---|---|---|---|---|"]
    for gpx, method, sec, rss in rows:
        out.append(f"| {gpx:.2f} | {method} | {sec:.0f} | {gpx * 1000 / sec:.1f} | "
                   f"{rss:.0f} |")
    if a.no_stainfuser:
        record(out)
        return
    per_tile = stainfuser_tiles("cpu", "fp32", a.steps, 1)
    out.append(f"\nstainfuser on this CPU, full-size random networks, 512 px, fp32: "
               f"{per_tile:.1f} s/tile at {a.steps} steps, about "
               f"{per_tile * 20 / a.steps:.0f} s/tile at 20 (extrapolated linearly in steps: an "
               "upper bound, as the VAE passes run once and are counted in each step).")
    record(out)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
