"""Benchmark: the GPU figures of issue 21 (item 3), in one script sized for ~175 s on an H200.

Parts, each timed after its own warm-up, all networks at full size with random weights (speed does
not depend on their values), bf16:
  * matmul: the bf16 matrix-product ceiling of this GPU (8192^3), the yardstick for the rest;
  * pixcell: PixCell-1024 at 1024 px, 20 steps, guidance 1.2: s/tile of the sampler for the naive
    loop (one tile, separate unconditional pass) against the engine's batched sampler (batch 1,
    4, 8, 16; 8 steps with the few-step samplers), then the engine with each attention kernel
    forced (flash, cuDNN, memory-efficient), with fused QKV projections, with `torch.compile` of
    the transformer blocks as the engine ships it on CUDA, and with both (the compiled rows
    time-boxed); the FLOPs of a tile counted by torch's flop counter, and the fraction of the
    compute floor (those FLOPs at the matmul ceiling) reached; the whole tile path (UNI2-h
    tokens, flow, sampling, decode);
  * vae: the SD3.5 VAE decode of one 1024-px tile (s/tile);
  * embed: UNI2-h crops/s (autocast as `embed` runs it, bf16 weights, and the whole encode path
    from uint8 tiles in host memory); issue 21's target >= 300 crops/s;
  * fast: the demo-ki67 fast engine on 576-px inputs (512-px tiles + 32 px context) from real
    tissue, in memory (fp32 as shipped at the GPU batch and at batch 8, `--dtype bf16`, the
    network alone in NCHW and channels-last), the batch's host <-> GPU copies (pageable and
    pinned, each way), then through the `translate` step itself (`stainctl tile` + `stainctl
    translate -w WS`, whole processes, reading and writing overlapped as the step does them; also
    at a CPU's --batch-size 8 --readers 2) on a pyramid of real CMU-1 tissue built here, and the
    step's reading and writing alone; target >= 500 tiles/s.
A markdown block with the device name and the command is printed and appended to the results
file; a part that fails or runs out of the time budget is recorded as such and the others go on.

    python bench/gpu.py --device cuda                     # the GPU run (~175 s on an H200)
    python bench/gpu.py --device cpu --smoke              # tiny sizes: checks the code paths
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the GPU machine)
sys.path.insert(0, str(ROOT / "bench"))  # the other benchmarks' helpers (_common, scale, ...)
SAMPLE = ROOT / "stainctl" / "samples" / "CMU-1-Small-Region.svs"
# compile right after pixcell: its shipped-engine row is the one a user's run depends on (it ran
# out of the budget when it came last).
PARTS = ("matmul", "pixcell", "compile", "vae", "embed", "fast")


class OutOfTime(Exception):
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise OutOfTime("terminated (the device script's timeout)")


class Bench:
    """Settings, the clock and what was measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.rows: list[tuple[str, str, str]] = []  # (part, what, value)
        self.notes: list[str] = []
        self.ceiling_tflops: float | None = None
        self.best: dict[str, str] = {}  # part -> its fastest variant, a note
        self.compile_job: Callable[[], None] | None = None

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], repeats: int = 1) -> float:
        """Seconds of one call, the best of `repeats` (after the caller's warm-up)."""
        best = float("inf")
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best

    def add(self, part: str, what: str, value: str) -> None:
        self.rows.append((part, what, value))
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {part}: {what} = {value}", flush=True)


@contextlib.contextmanager
def _device_default(device: Any) -> Iterator[None]:
    """Build networks straight on the device (random init of 600 M parameters on a GPU takes a
    fraction of the CPU's time)."""
    import torch

    with torch.device(device):
        yield


# --------------------------------------------------------------------------- matmul


def part_matmul(b: Bench) -> None:
    import torch

    n = 8192 if not b.args.smoke else 512
    dtype = torch.bfloat16 if b.cuda else torch.float32
    x = torch.randn(n, n, device=b.device, dtype=dtype)
    y = torch.randn(n, n, device=b.device, dtype=dtype)
    for _ in range(3):
        x @ y
    reps = 10
    sec = b.timed(lambda: [x @ y for _ in range(reps)]) / reps
    b.ceiling_tflops = 2 * n**3 / sec / 1e12
    b.add("matmul", f"{n}^3 {str(dtype).removeprefix('torch.')} product, TFLOP/s",
          f"{b.ceiling_tflops:.3g}")


# --------------------------------------------------------------------------- pixcell


def _pixcell_config(smoke: bool) -> Any:
    from stainctl.engines.pixcell.config import PixCellConfig

    if not smoke:
        return PixCellConfig()
    base = PixCellConfig()
    return PixCellConfig(
        {**base.transformer, "num_layers": 2, "num_attention_heads": 2,
         "attention_head_dim": 32, "cross_attention_dim": 64, "sample_size": 32},
        {**base.vae, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
        base.scheduler, {**base.flow, "width": 64, "time_dim": 64, "bottleneck": 64,
                         "blocks": 1}, 2)


def _uni2h(b: Bench) -> Any:
    from stainctl.models.encoders import EncoderSpec, TileEncoder, build_network
    from stainctl.models.registry import SHIPPED, get_card

    card = get_card("uni2-h", SHIPPED)
    spec = EncoderSpec.from_card(card)
    if b.args.smoke:  # the same class, tiny
        kwargs = {**spec.timm_kwargs, "embed_dim": 48, "depth": 1, "num_heads": 2}
        kwargs["img_size"] = 56
        spec = EncoderSpec(spec.family, spec.timm_model, 64, 56, spec.mean, spec.std, kwargs)
    with _device_default(b.device):
        net = build_network(spec)
    return TileEncoder(card.name, spec, net, 0.5, str(b.device), "bf16" if b.cuda else "fp32")


def _build_pixcell(b: Bench) -> Any:
    import torch

    from stainctl.engines.base import EngineOptions
    from stainctl.engines.pixcell.engine import (
        PixCellEngine,
        PixCellParts,
        build_transformer,
        build_vae,
    )
    from stainctl.engines.pixcell.flow import FlowMLP
    from stainctl.models.card import ModelCard

    torch.manual_seed(0)
    config = _pixcell_config(b.args.smoke)
    with _device_default(b.device):
        transformer = build_transformer(config)
        vae = build_vae(config)
        flow = FlowMLP(**config.flow)
    if b.args.smoke:  # the tiny encoder gives 64-d tokens: match the caption width
        config.transformer["caption_channels"] = 48
        with _device_default(b.device):
            transformer = build_transformer(config)
            flow = FlowMLP(**{**config.flow, "channels": 48})
    parts = PixCellParts(config, transformer, vae, _uni2h(b), flow)
    card = ModelCard("bench", "marker", "pixcell", 0.5, config.image_size, "", "", "",
                     marker="x")
    # Uncompiled: the variants below are eager; the `compile` part compiles (the engine's own
    # path, the default on CUDA, then with fused QKV).
    options = EngineOptions(device=str(b.device), steps=b.args.steps, guidance=1.2,
                            dtype="bf16" if b.cuda else "fp32", compile="off")
    return PixCellEngine(card, parts, options, str(b.device))


def _tile_flops(transformer: Any, x: Any, tokens: Any, steps: int) -> float:
    """FLOPs of one tile's sampling: one forward pass of batch 1, counted by torch, times two
    (the unconditional pass of guidance) times the steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    ts = torch.full((1,), 500, device=x.device)
    with torch.no_grad(), counter:
        transformer(x[:1], encoder_hidden_states=tokens[:1], timestep=ts, return_dict=False)
    return float(counter.get_total_flops()) * 2 * steps


def part_pixcell(b: Bench) -> None:
    from translate_pixcell import naive  # the public scripts' loop

    from stainctl.engines.pixcell.sampling import initial_noise, sample_latents

    t = time.perf_counter()
    engine = _build_pixcell(b)
    parts, config = engine.parts, engine.parts.config
    b.add("pixcell", "networks built (s)", f"{time.perf_counter() - t:.1f}")
    tr = parts.transformer
    side = config.image_size
    latent = side // config.downscale
    steps, batch = b.args.steps, b.args.batch
    shape = (config.latent_channels, latent, latent)
    sweep = [n for n in ((1, 4, 16) if b.cuda else (1, 4)) if n != batch]  # batch sizes
    rows = max(batch, *sweep)
    noise = initial_noise(list(range(rows)), shape).to(b.device)
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (rows, side, side, 3), dtype=np.uint8)
    cond = engine.tokens(tiles)
    tiles = tiles[:batch]
    uncond = tr.uncond_embedding.float()
    flops = _tile_flops(tr, noise.to(engine.dtype), cond.to(engine.dtype), steps)
    b.add("pixcell", f"FLOPs a tile ({side} px, {steps} steps, guidance), counted",
          f"{flops / 1e12:.1f} T")

    def sampler(n: int, k: int = steps) -> Callable[[], Any]:
        return lambda: sample_latents(tr, config.scheduler, cond[:n], uncond, noise[:n], k,
                                      1.2, engine.dtype)

    # Naive: one tile, two passes of batch 1 a step.
    naive(parts, cond, noise[:1], 2, 1.2, engine.dtype, decode=False)  # warm-up
    naive_s = b.timed(lambda: naive(parts, cond, noise[:1], steps, 1.2, engine.dtype,
                                    decode=False))
    b.add("pixcell", "naive loop, sampler s/tile (batch 1)", f"{naive_s:.3f}")
    results: dict[str, float] = {}

    def variant(name: str, context: Callable[[], Any] = contextlib.nullcontext,
                reserve: float = 20) -> bool:
        """Times the sampler as `name`; False when it was skipped or failed."""
        if b.left() < reserve:
            b.add("pixcell", f"engine, {name}", "skipped (time budget)")
            return False
        try:
            with context():
                sampler(batch, 2)()  # warm-up at the timed shapes (and compiling, if any)
                sec = b.timed(sampler(batch)) / batch
        except OutOfTime:
            raise
        except Exception as err:  # a kernel this GPU or build lacks
            b.add("pixcell", f"engine, {name}", f"failed: {type(err).__name__}: {err}"[:160])
            return False
        results[name] = sec
        frac = ""
        if b.ceiling_tflops:
            floor = flops / (b.ceiling_tflops * 1e12)
            frac = f", {100 * floor / sec:.0f} % of the compute floor ({floor:.3f} s)"
        b.add("pixcell", f"engine, {name}, sampler s/tile (batch {batch})",
              f"{sec:.3f} ({naive_s / sec:.2f}x naive{frac})")
        best = min(results, key=results.__getitem__)
        b.best["pixcell"] = (f"pixcell: fastest sampler variant here: {best} "
                             f"({results[best]:.3f} s/tile, {naive_s / results[best]:.2f}x "
                             "naive).")
        return True

    variant("SDPA default kernel (uncompiled)")
    for n in sweep:  # the batch size translate --batch-size sets, as shipped otherwise
        if b.left() < 40:
            b.add("pixcell", f"engine, uncompiled, batch {n}", "skipped (time budget)")
            continue
        sampler(n, 2)()
        sec = b.timed(sampler(n)) / n
        b.add("pixcell", f"engine, uncompiled, sampler s/tile (batch {n})",
              f"{sec:.3f} ({naive_s / sec:.2f}x naive)")
    for sampler_name in ("dpm++-karras", "unipc"):  # item 4's few-step samplers: speed only
        if b.left() < 40:
            break
        few = min(8, steps)

        def run_few(k: int = few, name: str = sampler_name) -> Any:
            return sample_latents(tr, config.scheduler, cond[:batch], uncond, noise[:batch], k,
                                  1.2, engine.dtype, sampler=name)

        run_few(2)
        sec = b.timed(run_few) / batch
        b.add("pixcell", f"engine, uncompiled, --steps {few} --sampler {sampler_name}, "
              f"sampler s/tile (batch {batch})", f"{sec:.3f}")
    # The whole tile path as translate runs it: UNI2-h tokens, the flow, sampling and decode.
    if b.left() > 25:
        seeds = list(range(batch))
        engine.translate(tiles[:2], seeds[:2])  # warm-up of the encoder, flow and decode shapes
        sec = b.timed(lambda: engine.translate(tiles, seeds)) / batch
        b.add("pixcell", f"engine.translate, whole tile path s/tile (batch {batch})",
              f"{sec:.3f}")
    if b.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, backend in (("flash attention", SDPBackend.FLASH_ATTENTION),
                               ("cuDNN attention", SDPBackend.CUDNN_ATTENTION),
                               ("memory-efficient attention", SDPBackend.EFFICIENT_ATTENTION)):
            variant(f"SDPA forced to {label}",
                    lambda backend=backend: sdpa_kernel([backend]))  # type: ignore[misc]
    try:
        tr.fuse_qkv_projections()
        variant("fused QKV projections")
    except Exception as err:
        b.add("pixcell", "engine, fused QKV projections", f"failed: {err}"[:160])
    b.compile_job = lambda: _compiled(b, engine, variant)  # the `compile` part, next


def part_compile(b: Bench) -> None:
    """torch.compile of each transformer block (regional: the 28 identical blocks share one
    compiled graph, so compiling costs seconds, not minutes), on the pixcell part's networks,
    with whatever time is left."""
    job, b.compile_job = b.compile_job, None  # the pixcell networks go with it, run or not
    if job is None:
        b.add("compile", "torch.compile", "not run (the pixcell part did not finish)")
        return
    if b.args.no_compile or not (b.cuda or b.args.smoke):
        b.add("compile", "torch.compile", "not run (--no-compile, or a CPU)")
        return
    job()


def _compiled(b: Bench, engine: Any, variant: Callable[..., bool]) -> None:
    import torch

    if b.left() < 45:
        b.add("pixcell", "engine, torch.compile", "skipped (time budget)")
        return
    tr = engine.parts.transformer
    # What ships: the engine's own compile path (PixCellEngine.compile_blocks, the default on
    # CUDA), without the fused QKV projections the pixcell part left on.
    with contextlib.suppress(Exception):  # if the pixcell part could fuse them
        tr.unfuse_qkv_projections()
    t = time.perf_counter()
    engine.compile_blocks()
    try:
        if variant("as shipped on CUDA (compiled blocks)", reserve=45):
            b.add("pixcell", "engine's compile: compile + warm-up + timed run (s)",
                  f"{time.perf_counter() - t:.1f}")
    finally:
        engine.uncompile_blocks()
        with contextlib.suppress(Exception):
            tr.fuse_qkv_projections()
    if b.left() < 45:
        b.add("pixcell", "engine, fused QKV + torch.compile", "skipped (time budget)")
        return
    blocks = tr.transformer_blocks
    originals = list(blocks)
    t = time.perf_counter()
    try:
        for i, block in enumerate(originals):
            blocks[i] = torch.compile(block, dynamic=False)
        if variant("fused QKV + torch.compile of the blocks", reserve=45):
            b.add("pixcell", "torch.compile: that variant's compile + warm-up + timed run (s)",
                  f"{time.perf_counter() - t:.1f}")
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


# --------------------------------------------------------------------------- vae


def part_vae(b: Bench) -> None:
    import torch

    from stainctl.engines.pixcell.engine import build_vae
    from stainctl.engines.pixcell.sampling import decode_latents

    config = _pixcell_config(b.args.smoke)
    with _device_default(b.device):
        vae = build_vae(config).eval().requires_grad_(False)
    latent = config.image_size // config.downscale
    dtype = torch.bfloat16 if b.cuda else torch.float32
    n = 4
    lat = torch.randn(n, config.latent_channels, latent, latent, device=b.device)
    decode_latents(vae, lat[:1], dtype)
    decode_latents(vae, lat, dtype)  # warm-up at the timed shape
    sec = b.timed(lambda: decode_latents(vae, lat, dtype)) / n
    b.add("vae", f"decode, s/tile ({config.image_size} px, chunks of 4, bf16 autocast)",
          f"{sec:.3f}")
    if b.cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        b.add("vae", "peak GPU memory so far (GiB)", f"{peak:.1f}")


# --------------------------------------------------------------------------- embed


def part_embed(b: Bench) -> None:
    import torch

    enc = _uni2h(b)
    net, size = enc.network, enc.spec.input_size
    batch = b.args.embed_batch
    params = sum(p.numel() for p in net.parameters()) / 1e6
    b.add("embed", "UNI2-h parameters (M)", f"{params:.1f}")
    crops = torch.randn(batch, 3, size, size, device=b.device)
    reps = 2 if b.args.smoke else 8

    def rate(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        return batch * reps / b.timed(lambda: [fn() for _ in range(reps)])

    with torch.inference_mode():
        with enc._autocast():
            r = rate(lambda: net(crops))
        b.add("embed", f"network forward, fp32 weights + bf16 autocast (as `embed`), batch "
              f"{batch}, crops/s", f"{r:.0f}")
        if b.cuda:
            half = net.to(torch.bfloat16)
            cb = crops.to(torch.bfloat16)
            r2 = rate(lambda: half(cb))
            b.add("embed", f"network forward, bf16 weights, batch {batch}, crops/s",
                  f"{r2:.0f}")
            net.to(torch.float32)
    tiles = np.random.default_rng(0).integers(0, 255, (batch, enc.spec.crop, enc.spec.crop, 3),
                                              dtype=np.uint8)
    r3 = rate(lambda: enc.encode(tiles, half=True))
    b.add("embed", f"TileEncoder.encode from uint8 {enc.spec.crop}-px tiles in host memory "
          f"(copy, resize, network, fp16 back), crops/s", f"{r3:.0f}")
    b.notes.append(f"embed: UNI2-h {r3:.0f} crops/s through the encode path "
                   f"(target >= 300: {'met' if r3 >= 300 else 'missed'}).")


# --------------------------------------------------------------------------- fast


def _tissue_tiles(side: int, n: int) -> np.ndarray:
    import openslide

    src = openslide.OpenSlide(str(SAMPLE))
    w, h = src.dimensions
    rgb = np.asarray(src.read_region((0, 0), 0, (w, h)).convert("RGB"))
    rng = np.random.default_rng(0)
    ys = rng.integers(0, h - side, n)
    xs = rng.integers(0, w - side, n)
    return np.stack([rgb[y:y + side, x:x + side] for y, x in zip(ys, xs, strict=True)])


def part_fast(b: Bench) -> None:
    import torch

    from stainctl.engines.base import EngineOptions, load_engine
    from stainctl.models.registry import SHIPPED, get_card

    engine = load_engine(get_card("demo-ki67", SHIPPED), SHIPPED,
                         EngineOptions(device=str(b.device)))
    side = 512 + 2 * engine.margin
    batch = b.args.fast_batch
    tiles = _tissue_tiles(side, batch)
    reps = 2 if b.args.smoke else 10
    gen = engine.generator

    def rate(fn: Callable[[], Any]) -> float:
        fn()
        return batch * reps / b.timed(lambda: [fn() for _ in range(reps)])

    r = rate(lambda: engine.translate(tiles))
    layout = "channels-last" if engine.channels_last else "NCHW"
    b.add("fast", f"engine.translate, fp32 as shipped ({layout}), batch {batch} of {side}-px "
          "tiles (host -> GPU -> host), tiles/s", f"{r:.0f}")
    if batch > 8:  # translate's default --batch-size
        r = 8 * reps / b.timed(lambda: [engine.translate(tiles[:8]) for _ in range(reps)])
        b.add("fast", "engine.translate, batch 8 (translate's default), tiles/s", f"{r:.0f}")
    if b.cuda:
        half = load_engine(get_card("demo-ki67", SHIPPED), SHIPPED,
                           EngineOptions(device=str(b.device), dtype="bf16"))
        r = rate(lambda: half.translate(tiles))
        b.add("fast", "engine.translate, --dtype bf16, tiles/s", f"{r:.0f}")
        half.close()
        x = torch.from_numpy(tiles).to(b.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        marker = torch.full((batch,), engine.index, dtype=torch.long, device=b.device)
        with torch.inference_mode():
            for fmt in (torch.contiguous_format, torch.channels_last):
                gen.to(memory_format=fmt)
                xf = x.contiguous(memory_format=fmt)
                name = "NCHW" if fmt == torch.contiguous_format else "channels-last"
                r1 = rate(lambda xf=xf: gen(xf, marker))
                b.add("fast", f"generator alone, fp32, {name}, tiles/s", f"{r1:.0f}")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    r2 = rate(lambda xf=xf: gen(xf, marker))
                b.add("fast", f"generator alone, bf16 autocast, {name}, tiles/s", f"{r2:.0f}")
        _transfers(b, tiles, rate)
    engine.close()
    if b.left() < 30:
        b.add("fast", "translate step", "skipped (time budget)")
        return
    _translate_step(b)


def _transfers(b: Bench, tiles: np.ndarray, rate: Callable[[Callable[[], Any]], float]) -> None:
    """The batch's copies alone, each way: as engine.translate does them now (the readers'
    pageable numpy batch in, a fresh pageable tensor out), and through pinned buffers, with and
    without the host copies into and out of them that a pinned engine would need unless the
    readers wrote straight into pinned memory. engine.translate runs at ~890 tiles/s where its
    network alone runs at ~3,400: whether pinned buffers would lift it is for the next device
    run to see."""
    import torch

    def upload(src: Any, fill: Any = None) -> None:
        if fill is not None:
            src.copy_(fill)  # the readers' batch into the pinned buffer
        src.to(b.device, non_blocking=src.is_pinned())
        torch.cuda.synchronize()

    def download(dst: Any, src: Any, out: bool) -> None:
        dst.copy_(src)
        if out:
            dst.numpy().copy()  # the result out of the buffer before it is reused

    try:  # measurements for later: a failure here must not cost the step's figures
        host = torch.from_numpy(tiles)
        pinned = host.pin_memory()
        on_gpu = host.to(b.device)
        for what, fn in (
                ("host -> GPU copy of the batch from pageable memory (as now)",
                 lambda: upload(host)),
                ("host -> GPU copy of the batch from a pinned buffer", lambda: upload(pinned)),
                ("host -> GPU copy of the batch through a pinned buffer (host copy in included)",
                 lambda: upload(pinned, host)),
                ("GPU -> host copy of the batch into a new pageable tensor (as now)",
                 lambda: on_gpu.cpu()),
                ("GPU -> host copy of the batch into a pinned buffer",
                 lambda: download(pinned, on_gpu, False)),
                ("GPU -> host copy of the batch through a pinned buffer (host copy out included)",
                 lambda: download(pinned, on_gpu, True))):
            b.add("fast", f"{what}, tiles/s", f"{rate(fn):.0f}")
    except Exception as err:
        b.add("fast", "host <-> GPU copies", f"failed: {type(err).__name__}: {err}"[:200])


def _run(args: list[str], report: list[float] | None = None) -> float:
    """Seconds of a whole `stainctl` process; with `report`, run with --json and append the
    step's own tiles/s (translate_tiles alone: no start-up, model load or glass-tile forward,
    which carries the process's first CUDA calls)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stainctl", *args,
                           "--json" if report is not None else "-q"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"stainctl {' '.join(args)}: {proc.stderr.strip()[-400:]}")
    if report is not None:
        report.extend(float(s["details"]["tiles_per_s"])
                      for s in json.loads(proc.stdout)["slides"])
    return time.perf_counter() - t


def _translate_step(b: Bench) -> None:
    import sqlite3

    side = 4096 if b.args.smoke else b.args.slide_px
    with tempfile.TemporaryDirectory(prefix="stainctl-gpu-") as tmp:
        slide, ws = Path(tmp) / "mosaic.tif", Path(tmp) / "ws"
        t = time.perf_counter()
        from _common import write_pyramid

        write_pyramid(slide, side, side)
        b.add("fast", f"built {side} x {side} px uncompressed pyramid of CMU-1 tissue (s)",
              f"{time.perf_counter() - t:.1f}")
        _run(["tile", str(slide), "-w", str(ws), "--min-tissue", "0.05"])
        _run(["filter", "-w", str(ws), "--workers", str(os.cpu_count() or 2)])
        with sqlite3.connect(ws / "manifest.sqlite") as db:
            n = db.execute("SELECT count(*) FROM tiles WHERE in_tissue = 1").fetchone()[0]
        # As a user runs it: --batch-size and --readers left to the engine (64 and up to 8
        # on a GPU, EngineShape).
        cmd = ["translate", "-w", str(ws), "--marker", "demo-ki67", "--device", str(b.device)]
        own: list[float] = []
        sec = _run(cmd, own)
        noop = _run(cmd)  # everything done: start-up, manifest, model load and the skip
        net = max(sec - noop, 1e-9)
        b.add("fast", f"`stainctl translate -w` step (default batch and readers), {n} tissue "
              "tiles, whole process (s)", f"{sec:.2f} ({n / sec:.0f} tiles/s)")
        b.add("fast", "same command with nothing left to do (start-up) (s)", f"{noop:.2f}")
        b.add("fast", "translate step tiles/s, start-up subtracted", f"{n / net:.0f}")
        b.add("fast", "the step's own rate (its --json tiles_per_s: reading, engine and "
              "writing, after the first CUDA forward)", f"{own[0]:.0f}" if own else "n/a")
        b.notes.append(f"fast: translate step {n / net:.0f} tiles/s after start-up "
                       f"(target >= 500: {'met' if n / net >= 500 else 'missed'}), "
                       f"{n / sec:.0f} tiles/s with it"
                       + (f", {own[0]:.0f} tiles/s its own rate." if own else "."))
        if b.left() > 45:  # the same step with the CPU's batch and readers
            sec = _run([*cmd, "--batch-size", "8", "--readers", "2", "--force"])
            b.add("fast", "the same step with --batch-size 8 --readers 2 (a CPU's defaults), "
                  "start-up subtracted, tiles/s", f"{n / max(sec - noop, 1e-9):.0f}")
        _step_parts(b, slide, side, n, Path(tmp) / "alone.zarr")


def _step_parts(b: Bench, slide: Path, side: int, n: int, store_path: Path) -> None:
    """The step's host work alone, on the same slide and as many tiles, in this process:
    reading the 576-px inputs (batches of --fast-batch, the fast engine's GPU default, with a
    CPU's 2 reader threads and a GPU's default) and writing the translated tiles to a tile
    store (the step's writer threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from scale import make_store, tile_grid

    from stainctl.cluster.pin import io_threads
    from stainctl.slide.tiles import TileSource, read_batches
    from stainctl.workspace.tilestore import TileStore

    tiles = tile_grid(side, side, 512, n)
    source = TileSource(str(slide), 576, 576)
    writers = io_threads()  # translate's writer threads where it runs

    for readers in sorted({2, io_threads()}):  # a CPU's default, and a GPU's (EngineShape)
        t = time.perf_counter()
        batches = list(read_batches(source, tiles[:, 2:] - 32, b.args.fast_batch, readers))
        b.add("fast", f"step's reading alone ({readers} reader threads), tiles/s",
              f"{n / (time.perf_counter() - t):.0f}")
    make_store(store_path, side, side, 512, 32)
    store = TileStore.open(store_path)
    t = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(lambda i: store.write(int(tiles[i, 0]), int(tiles[i, 1]),
                                            batches[i // len(batches[0])][i % len(batches[0])]),
                      range(n)))
    b.add("fast", f"step's writing alone ({writers} writer threads), tiles/s",
          f"{n / (time.perf_counter() - t):.0f}")


# --------------------------------------------------------------------------- report


def report(b: Bench, failures: dict[str, str]) -> str:
    import torch

    name = torch.cuda.get_device_name() if b.cuda else (platform.processor() or "cpu")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python " + " ".join(shlex.quote(a) for a in [
        str(Path(sys.argv[0]).relative_to(ROOT) if Path(sys.argv[0]).is_absolute()
            else sys.argv[0]), *sys.argv[1:]])
    lines = [f"### GPU figures (issue 21, item 3): `{cmd}`", "",
             f"Device: **{name}**, torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if b.cuda else "")
             + f"; run {when}, {time.perf_counter() - b.t0:.0f} s in all"
             + (" (SMOKE RUN: tiny networks, not a measurement)" if b.args.smoke else "")
             + ".", "", "| part | what | value |", "|---|---|---|"]
    lines += [f"| {p} | {w} | {v} |" for p, w, v in b.rows]
    lines += [""] + [f"- {n}" for n in [*b.best.values(), *b.notes]]
    lines += [f"- {p}: FAILED: {e}" for p, e in failures.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="pixcell tiles a batch")
    ap.add_argument("--embed-batch", type=int, default=256, help="UNI2-h crops a batch")
    ap.add_argument("--fast-batch", type=int, default=64, help="fast-engine tiles a batch")
    ap.add_argument("--slide-px", type=int, default=24576, help="side of the synthetic slide")
    ap.add_argument("--budget", type=float, default=175.0, help="seconds for the whole run")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny networks: check the code paths")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch = min(args.steps, 2), min(args.batch, 2)
        args.embed_batch, args.fast_batch = min(args.embed_batch, 4), min(args.fast_batch, 4)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (use --device cpu --smoke)")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (the fast engine as shipped)
    torch.backends.cudnn.allow_tf32 = True
    signal.signal(signal.SIGTERM, _on_term)
    b = Bench(args)
    failures: dict[str, str] = {}
    funcs = {"matmul": part_matmul, "pixcell": part_pixcell, "vae": part_vae,
             "embed": part_embed, "fast": part_fast, "compile": part_compile}
    try:
        for part in args.parts.split(","):
            if b.left() < 5:
                failures[part] = "not run: out of the time budget"
                continue
            try:
                funcs[part](b)
                if b.cuda:  # the part's networks are gone with its frame: free their memory
                    gc.collect()
                    torch.cuda.empty_cache()
            except OutOfTime:
                raise
            except Exception as err:
                traceback.print_exc()
                failures[part] = f"{type(err).__name__}: {err}"[:300]
    except OutOfTime as err:
        failures["run"] = str(err)
    text = report(b, failures)
    print("\n" + text, flush=True)
    if args.results:
        from _common import add_to_results

        add_to_results("GPU figures (issue 21, item 3)", text, Path(args.results))
    print(json.dumps({"rows": len(b.rows), "failures": list(failures)}))


if __name__ == "__main__":
    main()
