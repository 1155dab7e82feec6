"""Batched diffusion sampling: DPM-Solver++ (or, for few steps, DPM-Solver++ with Karras sigmas
or UniPC) with classifier-free guidance, one seed per tile.

One forward pass per solver step for the whole batch: the conditional and unconditional inputs
are stacked (2B) and the timestep is a (B,) tensor, where the public scripts loop tile by tile
with a separate unconditional pass. Each tile's starting noise comes from its own seed, so a tile
is generated the same whatever batch it falls in, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from stainctl.errors import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a GPU; on a CPU use bf16 or fp32")
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    out = torch.empty((len(seeds), *shape))
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
    return out


def make_scheduler(config: dict[str, Any], sampler: str = "dpm++") -> Any:
    """The solver for `sampler` (engines.base.SAMPLERS) on the model's noise schedule `config`:
    the shipped DPM-Solver++ 2M; the same on Karras-spaced sigmas, which put more of few steps
    at low noise; or UniPC (bh2, order 2), a predictor-corrector made for 5-10 steps."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config)
    if sampler == "dpm++-karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    if sampler == "unipc":
        unipc = {k: v for k, v in config.items() if k not in ("algorithm_type", "solver_type")}
        return UniPCMultistepScheduler.from_config(unipc, solver_type="bh2", predict_x0=True)
    raise UsageError(f"unknown sampler {sampler!r}")


@torch.no_grad()
def sample_latents(transformer: Any, scheduler_config: dict[str, Any], cond: torch.Tensor,
                   uncond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,
                   dtype: torch.dtype, sampler: str = "dpm++") -> torch.Tensor:
    """Latents (B, C, h, w) from tokens `cond` (B, T, D), the stored `uncond` (T, D) and the
    starting `noise` (on the transformer's device)."""
    device = noise.device
    scheduler = make_scheduler(scheduler_config, sampler)
    scheduler.set_timesteps(steps, device=device)
    b, channels = noise.shape[0], noise.shape[1]
    x = noise * scheduler.init_noise_sigma
    guided = guidance > 1.0
    tokens = torch.cat([cond, uncond.expand(b, -1, -1)]) if guided else cond
    tokens = tokens.to(device)
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        timestep = t.expand(inp.shape[0]).to(device)
        with autocast(device, dtype):
            out = transformer(inp, encoder_hidden_states=tokens, timestep=timestep,
                              return_dict=False)[0]
        eps = out[:, :channels].float()  # the first half is the noise; the rest is sigma
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, dtype: torch.dtype,
                   chunk: int = 4) -> torch.Tensor:
    """uint8 (B, H, W, 3) images on the CPU from generated (normalised) latents, `chunk` at a
    time (the VAE decoder is the memory peak at 1024 px)."""
    from stainctl.engines.pixcell.config import LatentScaling

    scaling = LatentScaling.of(vae.config)
    out = []
    for part in latents.split(chunk):
        with autocast(part.device, dtype):
            img = vae.decode(scaling.denormalise(part), return_dict=False)[0]
        img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out.append(img.permute(0, 2, 3, 1).cpu())
    return torch.cat(out)
