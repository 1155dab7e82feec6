"""Benchmark: the pixcell engine at full size (PixCell-1024 transformer, SD3.5 VAE, UNI2-h,
flow MLP), with random weights: speed does not depend on their values.

Two ways of generating the same tiles, in the same run, on the same networks:
  (a) naive: the public scripts' loop, one tile at a time with a separate unconditional pass
      (two forward passes of batch 1 per solver step), autocast, one VAE decode per tile;
  (b) engine: stainctl's PixCellEngine, a batch of tiles with the conditional and unconditional
      inputs stacked into one forward pass per step, a (B,) timestep, weights in the autocast
      dtype on a GPU.
On a GPU: tiles/s at 1024 px, 20 steps, guidance 1.2, bf16, the whole tile path included (UNI2-h
tokens, flow MLP, sampling, decode); issue 5's target is (b) >= 3x (a). On a CPU the whole path
at 1024 px takes minutes a tile, so only the sampler is timed, at 256 px (random tokens stand in
for UNI2-h's), as seconds per solver step a tile, and the VAE decode of one tile apart.

    python bench/translate_pixcell.py                     # GPU if there is one, else CPU
    python bench/translate_pixcell.py --cpu --side 256 --steps 2 --batch 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np


def build(side: int, device: str, with_encoder: bool) -> Any:
    import torch

    from stainctl.engines.pixcell.config import PixCellConfig
    from stainctl.engines.pixcell.engine import PixCellParts, build_transformer, build_vae
    from stainctl.engines.pixcell.flow import FlowMLP
    from stainctl.models.encoders import EncoderSpec, TileEncoder, build_network
    from stainctl.models.registry import SHIPPED, get_card

    torch.manual_seed(0)
    config = PixCellConfig()
    transformer = build_transformer(config)
    vae = build_vae(config)
    flow = FlowMLP(**config.flow)
    encoder = None
    if with_encoder:
        card = get_card("uni2-h", SHIPPED)
        spec = EncoderSpec.from_card(card)
        encoder = TileEncoder(card.name, spec, build_network(spec), 0.5, device,
                              "bf16" if device.startswith("cuda") else "fp32")
    return PixCellParts(config, transformer, vae, encoder, flow)


def naive(parts: Any, tokens: Any, noise: Any, steps: int, guidance: float, dtype: Any,
          decode: bool = True) -> Any:
    """One tile at a time, conditional and unconditional passes separately."""
    import torch

    from stainctl.engines.pixcell.sampling import make_scheduler
    from stainctl.engines.precision import autocast

    tr, vae = parts.transformer, parts.vae
    uncond = tr.uncond_embedding.float()[None]
    channels = parts.config.latent_channels
    out = []
    for i in range(noise.shape[0]):
        scheduler = make_scheduler(parts.config.scheduler)
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise[i:i + 1]
        for t in scheduler.timesteps:
            ts = t.reshape(1)
            with torch.no_grad(), autocast(noise.device, dtype):
                eps = tr(x, encoder_hidden_states=tokens[i:i + 1], timestep=ts,
                         return_dict=False)[0][:, :channels].float()
                if guidance > 1:
                    eps_u = tr(x, encoder_hidden_states=uncond, timestep=ts,
                               return_dict=False)[0][:, :channels].float()
                    eps = eps_u + guidance * (eps - eps_u)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        if not decode:
            out.append(x)
            continue
        with torch.no_grad(), autocast(noise.device, dtype):
            img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor,
                             return_dict=False)[0]
        out.append(((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    ap.add_argument("--side", type=int, default=None, help="tile px (1024 GPU, 256 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (20 GPU, 2 CPU)")
    ap.add_argument("--batch", type=int, default=None, help="tiles a batch (8 GPU, 2 CPU)")
    ap.add_argument("--guidance", type=float, default=1.2)
    ap.add_argument("--dtype", default="auto", help="bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from stainctl.engines.base import EngineOptions
    from stainctl.engines.pixcell.engine import PixCellEngine
    from stainctl.engines.pixcell.sampling import (
        decode_latents,
        initial_noise,
        sample_latents,
    )
    from stainctl.engines.precision import resolve_dtype
    from stainctl.models.card import ModelCard
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    side = args.side or (1024 if gpu else 256)
    steps = args.steps or (20 if gpu else 2)
    batch = args.batch or (8 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, torch.device(device))
    t0 = time.perf_counter()
    parts = build(side, device, with_encoder=gpu)
    built = time.perf_counter() - t0
    card = ModelCard("bench", "marker", "pixcell", 0.5, side, "", "", "", marker="x")
    sampling = EngineOptions(device=device, steps=steps, guidance=args.guidance,
                             dtype=args.dtype)
    engine = PixCellEngine(card, parts, sampling, device)  # moves the networks to the device
    engine.input_side = side
    latent = side // parts.config.downscale
    rng = np.random.default_rng(0)
    seeds = list(range(batch))
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "side": side,
        "steps": steps, "guidance": args.guidance, "batch": batch, "dtype": str(dtype),
        "build_s": round(built, 1),
        "transformer_params_m": round(sum(p.numel() for p in parts.transformer.parameters())
                                      / 1e6, 1)}

    if gpu:
        tiles = rng.integers(0, 255, (batch, side, side, 3), dtype=np.uint8)

        def run_naive() -> Any:
            tokens = engine.tokens(tiles)
            noise = initial_noise(seeds, (parts.config.latent_channels, latent, latent))
            return naive(parts, tokens, noise.to(device), steps, args.guidance, dtype)

        def run_engine() -> Any:
            return engine.translate(tiles, seeds)
    else:
        tokens = torch.randn(batch, parts.config.tokens, 1536)
        noise = initial_noise(seeds, (parts.config.latent_channels, latent, latent))
        uncond = parts.transformer.uncond_embedding.float()

        def run_naive() -> Any:  # the sampler only: the VAE decode is timed apart
            return naive(parts, tokens, noise, steps, args.guidance, dtype, decode=False)

        def run_engine() -> Any:
            return sample_latents(parts.transformer, parts.config.scheduler, tokens, uncond,
                                  noise, steps, args.guidance, dtype)

    timings = {}
    for name, fn in (("naive", run_naive), ("engine", run_engine)):
        fn() if gpu else None  # warm-up (kernels, allocator) on a GPU
        sync()
        t = time.perf_counter()
        fn()
        sync()
        timings[name] = time.perf_counter() - t
    for name, sec in timings.items():
        record[f"{name}_s"] = round(sec, 2)
        record[f"{name}_tiles_per_s"] = round(batch / sec, 4)
    record["speedup"] = round(timings["naive"] / timings["engine"], 2)
    if not gpu:
        for name, sec in timings.items():
            record[f"{name}_s_per_step_per_tile"] = round(sec / (steps * batch), 2)
        lat = torch.randn(1, parts.config.latent_channels, latent, latent)
        decode_latents(parts.vae, lat, dtype)  # warm-up
        t = time.perf_counter()
        decode_latents(parts.vae, lat, dtype)
        record["vae_decode_s_per_tile"] = round(time.perf_counter() - t, 2)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
