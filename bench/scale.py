"""Benchmark: translate on a Dask cluster (issue 17), with the shipped fast model (demo-ki67).

The tiles come from a multi-gigapixel pyramidal TIFF built from real tissue (bench/_common.py),
spread over the whole slide, and go through the code `translate` runs (steps/translate_work.py:
read-ahead threads, the engine, the tile-store writer pool), in this process or as shard tasks
on local Dask workers; the engine is loaded (and warmed up) before the clock starts.

CPU (default):
  (a) in-process (torch on all cores) vs one local worker process given the same cores:
      the distribution overhead; target >= 0.9 of in-process tiles/s.
  (b) one worker with one thread vs two workers with one thread each; target >= 1.7x.
      "One thread" means one core: each worker process is pinned to its own core (its reader
      and writer threads too, cluster/pin.py), torch on one thread. Each run also records each
      worker's CPU seconds over the wall time, the driver's, and which shards each worker ran.
GPU (`--device cuda`, one in-process engine, no Dask, dask-cuda or pyvips needed, ~90 s):
  tiles/s and the fraction of the wall time the GPU is busy, for the fast engine (target >= 85 %)
  and for the full-size pixcell engine with random weights (PixCell-1024, SD3.5 VAE, UNI2-h);
  busy = the CUDA-event time of the engine's calls over the wall time, and the mean of
  `nvidia-smi --query-gpu=utilization.gpu` sampled meanwhile where nvidia-smi exists.

    python bench/scale.py                    # CPU parts, appends to bench/RESULTS.md
    python bench/scale.py --device cuda      # GPU part
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import add_to_results, build_slide  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
MARKER = "demo-ki67"


def tile_grid(width: int, height: int, extent: int, n: int) -> np.ndarray:
    """(n, 4) col, row, level-0 x, y of `n` grid tiles spread over the slide."""
    cols, rows = width // extent - 2, height // extent - 2  # inner tiles: context in the slide
    idx = np.linspace(0, cols * rows - 1, n).astype(np.int64)
    c, r = idx % cols + 1, idx // cols + 1
    return np.stack([c, r, c * extent, r * extent], axis=1).astype(np.int64)


def make_store(path: Path, width: int, height: int, tile: int, margin: int) -> None:
    from stainctl.workspace.tilestore import StoreLayout, TileStore

    shutil.rmtree(path, ignore_errors=True)
    TileStore.create(path, StoreLayout(width=width, height=height, mpp=0.5, cols=-(-width // tile),
                                       rows=-(-height // tile), tile_size=tile, overlap=0,
                                       margin=margin))


def shard_tasks(slide: Path, store: Path, tiles: np.ndarray, key: Any, tile: int, margin: int,
                shard: int, batch: int) -> list[Any]:
    from stainctl.slide.tiles import TileSource
    from stainctl.steps.translate_work import ShardTask

    source = TileSource(str(slide), tile + 2 * margin, tile + 2 * margin)
    return [ShardTask(slide_id=1, slide_key="bench", shard=i, engine=key, source=source,
                      store=str(store), margin0=float(margin), tiles=tiles[s:s + shard], seed=0,
                      batch_size=batch, readers=2)
            for i, s in enumerate(range(0, len(tiles), shard))]


def spec_cluster(cores: list[tuple[int, ...]]) -> Any:
    """One one-thread worker per entry of `cores`, pinned to those cores (reader and writer
    threads included) with torch on that many threads: what `--devices cpu,...` starts."""
    import logging

    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    from stainctl.cluster.pin import worker_options

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        return SpecCluster(
            workers={i: {"cls": Nanny, "options": {"nthreads": 1, "silence_logs": logging.ERROR,
                                                    **worker_options(c)}}
                     for i, c in enumerate(cores)},
            scheduler={"cls": Scheduler, "options": {"dashboard": False,
                                                     "dashboard_address": ":0"}},
            silence_logs=logging.ERROR)


def _cpu_seconds() -> float:
    """This process's CPU time, all threads (run on each worker)."""
    return time.process_time()


def _affinity() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def on_cluster(tasks: list[Any], cores: list[tuple[int, ...]], store: Path,
               width: int, height: int, tile: int, margin: int) -> dict[str, Any]:
    """tiles/s of `tasks` on a fresh local cluster, engines loaded and warm first; and where
    the time went: each worker's CPU seconds over the wall time (1.0 = one core busy all the
    run), the driver's (scheduler and client), and which shards each worker ran."""
    from distributed import Client, wait

    from stainctl.steps.translate_work import cached_engine, run_shard

    with spec_cluster(cores) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(cores))
        key = tasks[0].engine
        warm = np.zeros((1, tile + 2 * margin, tile + 2 * margin, 3), np.uint8)
        client.run(lambda: cached_engine(key).translate(warm, [0]) is not None)
        pinned = client.run(_affinity)
        worker_name = {a: str(i["name"]) for a, i in client.scheduler_info()["workers"].items()}
        make_store(store, width, height, tile, margin)
        cpu0, driver0 = client.run(_cpu_seconds), time.process_time()
        t0 = time.perf_counter()
        futures = client.map(run_shard, tasks, pure=False)
        wait(futures)
        elapsed = time.perf_counter() - t0
        cpu1, driver1 = client.run(_cpu_seconds), time.process_time()
        results = client.gather(futures)
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"a shard failed: {errors[0]}")
    per_worker = {worker_name[a]: {"cores": pinned[a],
                                   "cpu_over_wall": round((cpu1[a] - cpu0[a]) / elapsed, 3),
                                   "shards": [], "busy_s": 0.0}
                  for a in sorted(cpu0, key=lambda a: worker_name[a])}
    for r in results:
        w = per_worker[r.worker]
        w["shards"].append(r.shard)
        w["busy_s"] = round(w["busy_s"] + r.seconds, 2)
    return {"tiles_per_s": round(sum(r.tiles for r in results) / elapsed, 3),
            "wall_s": round(elapsed, 2),
            "driver_cpu_over_wall": round((driver1 - driver0) / elapsed, 3),
            "workers": per_worker}


def _ceiling_worker(core: int, kind: str, key: Any, side: int, seconds: float,
                    start: Any, out: Any) -> None:
    """In a process pinned to `core`: how many units of pure work it does in `seconds` once
    every process is ready (kind "model": the engine on a batch of 8 tiles, torch on one
    thread, no reading or writing; "python": a loop that touches no memory)."""
    from stainctl.cluster.pin import pin_process

    pin_process([core])
    if kind == "model":
        import torch

        from stainctl.steps.translate_work import cached_engine

        torch.set_num_threads(1)
        engine = cached_engine(key)
        batch = np.random.default_rng(core).integers(0, 255, (8, side, side, 3), np.uint8)
        seeds = list(range(8))
        engine.translate(batch, seeds)

        def unit() -> None:
            engine.translate(batch, seeds)
    else:
        def unit() -> None:
            x = 0
            for i in range(200_000):
                x += i * i
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        unit()
        n += 1
    out.put(n / (time.perf_counter() - t0))


def ceiling(key: Any, side: int, cores: int, seconds: float = 8.0) -> dict[str, Any]:
    """The best (b) this machine allows: pure work in one process pinned to one core, against
    two such processes on two cores at once (units/s summed). Below 2x, the two cores slow each
    other down (shared caches, memory bandwidth, or virtual CPUs on one physical core)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {}
    for kind in ("python", "model"):
        rates = []
        for procs in (1, 2):
            start, queue = ctx.Barrier(procs), ctx.Queue()
            ps = [ctx.Process(target=_ceiling_worker,
                              args=(i % cores, kind, key, side, seconds, start, queue))
                  for i in range(procs)]
            for p in ps:
                p.start()
            rates.append(sum(queue.get() for _ in ps))
            for p in ps:
                p.join()
        out[kind] = {"one_core_units_per_s": round(rates[0], 3),
                     "two_cores_units_per_s": round(rates[1], 3),
                     "two_over_one": round(rates[1] / rates[0], 3)}
    return out


def in_process(tasks: list[Any], threads: int, store: Path, width: int, height: int, tile: int,
               margin: int) -> float:
    import torch

    from stainctl.steps.translate_work import cached_engine, run_shard

    torch.set_num_threads(threads)
    engine = cached_engine(tasks[0].engine)
    engine.translate(np.zeros((1, tile + 2 * margin, tile + 2 * margin, 3), np.uint8), [0])
    make_store(store, width, height, tile, margin)
    t0 = time.perf_counter()
    results = [run_shard(t) for t in tasks]
    elapsed = time.perf_counter() - t0
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"a shard failed: {errors[0]}")
    return sum(r.tiles for r in results) / elapsed


def cpu_part(args: argparse.Namespace, slide: Path, width: int, height: int) -> dict[str, Any]:
    from stainctl.engines.base import EngineOptions
    from stainctl.models.registry import SHIPPED
    from stainctl.steps.translate_work import EngineKey

    tile, margin, cores = 512, 32, os.cpu_count() or 1
    key = EngineKey(marker=MARKER, models_dir=str(SHIPPED), options=EngineOptions(device="cpu"))
    tiles = tile_grid(width, height, tile, args.tiles)
    tasks = shard_tasks(slide, Path(args.work) / "store.zarr", tiles, key, tile, margin,
                        args.shard, args.batch)
    geo = (Path(args.work) / "store.zarr", width, height, tile, margin)
    limit = ceiling(key, tile + 2 * margin, cores)
    rates = {"in_process": in_process(tasks, cores, *geo)}
    pin = list(range(cores))
    runs = {
        "one_worker_all_cores": on_cluster(tasks, [tuple(pin)], *geo),
        "one_worker_one_core": on_cluster(tasks, [(pin[0],)], *geo),
        "two_workers_one_core_each": on_cluster(tasks, [(pin[0],), (pin[1 % cores],)], *geo),
    }
    rates.update({k: v["tiles_per_s"] for k, v in runs.items()})
    return {"tiles": len(tiles), "shard_tiles": args.shard, "batch": args.batch,
            "cores": cores, **{k: round(v, 3) for k, v in rates.items()},
            "a_overhead_ratio": round(rates["one_worker_all_cores"] / rates["in_process"], 3),
            "b_two_workers_speedup": round(rates["two_workers_one_core_each"]
                                           / rates["one_worker_one_core"], 3),
            "machine_ceiling": limit, "runs": runs}


class GpuBusy:
    """The engine's calls timed on the GPU with CUDA events, and nvidia-smi sampled."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.events, self.samples = engine, [], []
        self._stop = threading.Event()
        self._smi = shutil.which("nvidia-smi")
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def translate(self, tiles: np.ndarray, seeds: Any) -> np.ndarray:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.engine.translate(tiles, seeds)
        end.record()
        self.events.append((start, end))
        return out

    def _sample(self) -> None:
        while not self._stop.is_set() and self._smi:
            try:
                out = subprocess.run([self._smi, "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits", "-i",
                                      os.environ.get("BENCH_GPU", "0")],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            time.sleep(0.2)

    def __enter__(self) -> GpuBusy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def busy_seconds(self) -> float:
        import torch

        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.events) / 1000


def gpu_run(engine: Any, slide: Path, tiles: np.ndarray, side: int, tile: int, margin: int,
            batch: int, store: Path, width: int, height: int) -> dict[str, Any]:
    import torch

    from stainctl.slide.tiles import TileSource
    from stainctl.steps.translate_work import translate_tiles
    from stainctl.workspace.tilestore import TileStore

    source = TileSource(str(slide), side, side)
    warm = np.zeros((batch, side, side, 3), np.uint8)
    engine.translate(warm, list(range(batch)))  # kernels chosen, memory allocated
    torch.cuda.synchronize()
    make_store(store, width, height, tile, margin)
    with GpuBusy(engine) as busy:
        t0 = time.perf_counter()
        n = translate_tiles(busy, source, TileStore.open(store), tiles,
                            present=np.zeros(len(tiles), bool), slide_key="bench",
                            margin0=float(margin), seed=0, batch_size=batch, readers=6)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        gpu = busy.busy_seconds()
    return {"tiles": n, "batch": batch, "tiles_per_s": round(n / wall, 2),
            "busy_cuda_events": round(gpu / wall, 3),
            "busy_nvidia_smi": round(float(np.mean(busy.samples)) / 100, 3)
            if busy.samples else None}


def gpu_part(args: argparse.Namespace, slide: Path, width: int, height: int) -> dict[str, Any]:
    import torch

    from stainctl.engines.base import EngineOptions, load_engine
    from stainctl.models.card import ModelCard
    from stainctl.models.registry import SHIPPED, get_card
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    work = Path(args.work)
    fast = load_engine(get_card(MARKER, SHIPPED), SHIPPED, EngineOptions(device="cuda"))
    out["fast"] = gpu_run(fast, slide, tile_grid(width, height, 512, args.gpu_tiles), 576, 512,
                          32, args.gpu_batch, work / "fast.zarr", width, height)
    fast.close()
    del fast
    torch.cuda.empty_cache()

    from translate_pixcell import build

    from stainctl.engines.pixcell.engine import PixCellEngine

    with torch.device("cuda"):  # random full-size weights, initialised on the GPU: seconds
        parts = build(1024, "cuda", with_encoder=True)
    card = ModelCard("bench", "marker", "pixcell", 0.5, 1024, "", "", "", marker="x")
    pix = PixCellEngine(card, parts, EngineOptions(device="cuda", steps=20, guidance=1.2,
                                                   dtype="bf16"), "cuda")
    out["pixcell"] = gpu_run(pix, slide, tile_grid(width, height, 896, args.pixcell_tiles),
                             1024, 896, 64, args.pixcell_batch, work / "pix.zarr", width, height)
    out["pixcell"]["steps"] = 20
    return out


def record(title: str, command: str, figures: dict[str, Any], lines: list[str]) -> None:
    text = [f"### {title}\n", f"    {command}\n", *(f"- {line}" for line in lines),
            f"\n```json\n{json.dumps(figures, indent=2)}\n```"]
    add_to_results("translate on a Dask cluster (issue 17)", "\n".join(text), RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpx", type=float, default=None,
                    help="slide size in gigapixels (default 2 on CPU, 1 on a GPU machine)")
    ap.add_argument("--slide", default=None, help="reuse/build the slide here")
    ap.add_argument("--tiles", type=int, default=48, help="CPU: tiles per run")
    ap.add_argument("--shard", type=int, default=8, help="CPU: tiles per shard")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gpu-tiles", type=int, default=1536)
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--pixcell-tiles", type=int, default=32)
    ap.add_argument("--pixcell-batch", type=int, default=8)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    gpx = args.gpx or (2.0 if args.device == "cpu" else 1.0)
    side = int((gpx * 1e9) ** 0.5) // 512 * 512
    with tempfile.TemporaryDirectory() as tmp:
        args.work = tmp
        slide = Path(args.slide or Path(tmp) / f"mosaic-{gpx:g}gpx.tif")
        t0 = time.perf_counter()
        if not slide.exists():
            build_slide(slide, side, side)
        built = round(time.perf_counter() - t0, 1)
        print(f"slide {slide} ({side} x {side} px, {side * side / 1e9:.2f} Gpx), "
              f"{built} s to build", flush=True)
        if args.device == "cpu":
            figures = {"machine": platform.processor() or platform.machine(),
                       **cpu_part(args, slide, side, side)}
        else:
            figures = gpu_part(args, slide, side, side)
    figures["slide_gpx"] = round(side * side / 1e9, 2)
    print(json.dumps(figures, indent=2))
    if args.no_record:
        return
    if args.device == "cpu":
        record("translate on a Dask cluster, CPU (issue 17: bench/scale.py)",
               "python bench/scale.py", figures,
               [f"(a) one local worker / in-process: {figures['a_overhead_ratio']} "
                "(target >= 0.9)",
                f"(b) two 1-thread workers / one 1-thread worker: "
                f"{figures['b_two_workers_speedup']}x (target >= 1.7x)"])
    else:
        record("translate on one GPU (issue 17: bench/scale.py --device cuda)",
               "python bench/scale.py --device cuda", figures,
               [f"fast: {figures['fast']['tiles_per_s']} tiles/s, GPU busy "
                f"{figures['fast']['busy_cuda_events']} (CUDA events; target >= 0.85)",
                f"pixcell (random full-size weights, 20 steps, bf16): "
                f"{figures['pixcell']['tiles_per_s']} tiles/s, GPU busy "
                f"{figures['pixcell']['busy_cuda_events']}"])


if __name__ == "__main__":
    main()
