"""Benchmark: the translate step's host side (reading, writing, the loop) against a stand-in for a
GPU engine, on this CPU (issue 21: the fast engine's step on an H200 ran at 372 tiles/s while
`engine.translate` alone managed 893).

The stand-in sleeps `len(batch) / --rate` seconds a batch with the GIL released, as a GPU's
kernels leave the host free, and gives back a copy of its input. `translate_tiles` (the code the
step runs: read-ahead threads, the engine, the tile-store writer pool) translates --tiles grid
tiles spread over an uncompressed pyramid of mirrored CMU-1 tissue (bench/_common.py) into a
fresh tile store, at the H200's settings (batch 64 and 8 readers, its default there; the writers
are this host's `io_threads()`, 2 on 2 cores) and a CPU's defaults (batch 8, 2 readers),
alternating, --rounds times each. Reported: tiles/s, and its ratio to --rate (1.0: the host
keeps up with the engine; the issue's target is 500 tiles/s of the step on an H200, whose
engine ran at 893).

    python bench/translate_host.py                         # ~1 minute on 2 cores
    python bench/translate_host.py --rate 890 --tiles 900 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, add_to_results, write_pyramid

sys.path.insert(0, str(ROOT))


class SleepingEngine:
    """An engine at `rate` tiles/s that leaves the host free while it 'runs'."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def translate(self, tiles: np.ndarray, seeds: Any) -> np.ndarray:
        time.sleep(len(tiles) / self.rate)
        return tiles.copy()


def run(slide: Path, side: int, tiles: np.ndarray, rate: float, batch: int, readers: int,
        store_dir: str | None) -> float:
    from scale import make_store

    from stainctl.slide.tiles import TileSource, cached_slide
    from stainctl.steps.translate_work import translate_tiles
    from stainctl.workspace.tilestore import TileStore

    direct = cached_slide(str(slide)).direct
    if direct is not None:
        direct.forget()  # every run decodes its stored tiles afresh
    with tempfile.TemporaryDirectory(dir=store_dir) as tmp:
        store = Path(tmp) / "store.zarr"
        make_store(store, side, side, 512, 32)
        t = time.perf_counter()
        n = translate_tiles(SleepingEngine(rate), TileSource(str(slide), 576, 576),
                            TileStore.open(store), tiles, present=np.zeros(len(tiles), bool),
                            slide_key="bench", margin0=32.0, seed=0, batch_size=batch,
                            readers=readers)
        return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=890.0, help="the stand-in engine's tiles/s")
    ap.add_argument("--tiles", type=int, default=900)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where the tile stores go; default memory (/dev/shm), so that this "
                         "disk's write-back does not decide the figure")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from scale import tile_grid

    side = 16384
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "mosaic.tif"
        write_pyramid(slide, side, side)
        tiles = tile_grid(side, side, 512, args.tiles)
        configs = {"H200 settings (batch 64, 8 readers; this host's writers)": (64, 8),
                   "CPU defaults (batch 8, 2 readers)": (8, 2)}
        rates: dict[str, list[float]] = {k: [] for k in configs}
        run(slide, side, tiles[:64], args.rate, 64, 8, args.store_dir)  # warm: imports, cache
        for _ in range(args.rounds):
            for name, (batch, readers) in configs.items():
                rates[name].append(run(slide, side, tiles, args.rate, batch, readers,
                                       args.store_dir))
    cmd = "python bench/translate_host.py " + " ".join(sys.argv[1:])
    lines = [f"### `{cmd}` ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"{len(tiles)} tiles of 576 px, engine stand-in at {args.rate:g} tiles/s, stores "
             f"in {args.store_dir or 'the temporary folder'}, medians of {args.rounds} "
             "alternating runs:", "",
             "| configuration | tiles/s | of the engine's rate | runs |", "|---|---|---|---|"]
    for name, values in rates.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.0f} | {med / args.rate:.2f} | "
                     f"{', '.join(f'{v:.0f}' for v in values)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        add_to_results("translate's host side against a GPU-rate engine (issue 21)", text)


if __name__ == "__main__":
    main()
