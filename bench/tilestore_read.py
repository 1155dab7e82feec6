"""Benchmark: decoding tile-store tiles on a main thread, with and without Blosc's thread pool.

numcodecs' Blosc decodes with a pool of threads when it is called from a process's main thread
(its default, `use_threads=None`); stainctl's tile store turns that off (`tilestore._blosc`).
This script fills a store with tiles of real tissue (the CMU-1 mosaic of bench/_common.py, the
576-px tiles translate writes at 512 px with 32 px of context), then, each in a fresh process so
that no pool is left over from an earlier run, decodes every tile on the main thread with the
pool ("pool") or without it ("store", what `TileStore.read_into` does), rounds alternating.
It also times encoding, as translate's writer does (the last decoded tile, encoded a quarter as
many times as there are tiles). Figures are medians of wall and
CPU seconds; the ratio is that of the medians.

    python bench/tilestore_read.py [--tiles 1600] [--rounds 4] [--record]
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
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_to_results, mosaic_block

SIDE = 576


def fill(path: Path, tiles: int) -> None:
    from scale import make_store

    from stainctl.workspace.tilestore import TileStore

    cols = 40
    rows = -(-tiles // cols)
    stride = SIDE - 64  # a 512-px grid tile with 32 px of context on each side
    make_store(path, cols * stride, rows * stride, stride, 32)
    store = TileStore.open(path)
    assert store.layout.side == SIDE
    block = mosaic_block()
    bh, bw = block.shape[:2]
    for i in range(tiles):
        r, c = divmod(i, cols)
        y, x = (r * stride) % (bh - SIDE), (c * stride) % (bw - SIDE)
        store.write(c, r, np.ascontiguousarray(block[y:y + SIDE, x:x + SIDE]))
    store.finish()


def child(path: Path, how: str) -> None:
    """Decode every tile of the store on this (main) thread, then encode them again."""
    import numcodecs.blosc

    from stainctl.workspace.tilestore import TileStore, chunk_file

    store = TileStore.open(path, writable=False)
    present = np.argwhere(store.written())
    out = np.empty((SIDE, SIDE, 3), np.uint8)
    if how == "pool":
        numcodecs.blosc.use_threads = None  # numcodecs' default
        blosc = numcodecs.blosc.Blosc()
        blobs = [chunk_file(path, int(c), int(r)) for r, c in present]

        def decode(r: int, c: int, i: int) -> None:
            blosc.decode(blobs[i].read_bytes(), out=out)
    else:
        def decode(r: int, c: int, i: int) -> None:
            store.read_into(int(c), int(r), out)

    t0, c0 = time.perf_counter(), _cpu()
    for i, (r, c) in enumerate(present):
        decode(r, c, i)
    read = (time.perf_counter() - t0, _cpu() - c0)
    codec = numcodecs.blosc.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.blosc.Blosc.SHUFFLE)
    t0, c0 = time.perf_counter(), _cpu()
    for _ in range(len(present) // 4):
        codec.encode(out)
    write = (time.perf_counter() - t0, _cpu() - c0)
    print(json.dumps({"tiles": len(present), "decode_s": read[0], "decode_cpu_s": read[1],
                      "encode_s": write[0], "encode_cpu_s": write[1]}))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=1600)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    with tempfile.TemporaryDirectory(prefix="stainctl-bench-") as tmp:
        store = Path(tmp) / "s.zarr"
        fill(store, args.tiles)
        runs: dict[str, list[dict[str, float]]] = {"pool": [], "store": []}
        for _ in range(args.rounds):
            for how in runs:
                out = subprocess.run([sys.executable, __file__, "--child", str(store), how],
                                     capture_output=True, text=True, check=True).stdout
                runs[how].append(json.loads(out))
    med = {how: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for how, rs in runs.items()}
    result = {how: {k: round(v, 3) for k, v in m.items()} for how, m in med.items()}
    result["decode_wall_ratio_store_vs_pool"] = round(
        med["store"]["decode_s"] / med["pool"]["decode_s"], 2)
    result["decode_cpu_ratio_store_vs_pool"] = round(
        med["store"]["decode_cpu_s"] / med["pool"]["decode_cpu_s"], 2)
    result["cpu"] = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    print(json.dumps(result, indent=2))
    if args.record:
        p, s = med["pool"], med["store"]
        add_to_results(
            "tile-store reads on a main thread",
            f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"`python bench/tilestore_read.py --tiles {args.tiles} --rounds {args.rounds}`\n\n"
            f"{int(s['tiles'])} tiles of {SIDE} px (lz4, as translate writes them), decoded on "
            f"a main thread, medians of {args.rounds} alternating fresh processes "
            f"({result['cpu']}):\n\n"
            "| | decode s | decode CPU s | encode s (a quarter of the tiles) |\n"
            "|---|---|---|---|\n"
            f"| Blosc's thread pool (numcodecs' default) | {p['decode_s']:.2f} | "
            f"{p['decode_cpu_s']:.2f} | {p['encode_s']:.3f} |\n"
            f"| `TileStore.read_into` (no pool) | {s['decode_s']:.2f} | "
            f"{s['decode_cpu_s']:.2f} | {s['encode_s']:.3f} |\n\n"
            f"Decoding without the pool: {result['decode_wall_ratio_store_vs_pool']}x the wall "
            f"time and {result['decode_cpu_ratio_store_vs_pool']}x the CPU time of decoding "
            "with it.")


if __name__ == "__main__":
    main()
