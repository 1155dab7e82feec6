"""Batched diffusion sampling: DPM-Solver++ (or, for few steps, DPM-Solver++ with Karras sigmas
or UniPC) with classifier-free guidance, one seed per tile.

One forward pass per solver step for the whole batch: the conditional and unconditional inputs
are stacked (2B) and the timestep is a (B,) tensor, where the public scripts loop tile by tile
with a separate unconditional pass. Each tile's starting noise comes from its own seed, so a tile
is generated the same whatever batch it falls in, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stainctl.engines.precision import autocast
from stainctl.errors import UsageError


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """The starting latents: each tile's noise from its own seed (engines.ddim.TileNoise)."""
    from stainctl.engines.ddim import TileNoise

    return TileNoise(seeds).draw(shape)


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


def _inversion_grid(scheduler_config: dict[str, Any], steps: int) -> list[int]:
    """Trailing DDIM timesteps, ascending: `steps` evenly spaced, the last at the final one."""
    total = int(scheduler_config.get("num_train_timesteps", 1000))
    return sorted({round(t) - 1 for t in torch.arange(total, 0, -total / steps).tolist()})


@torch.no_grad()
def invert_and_sample(transformer: Any, scheduler_config: dict[str, Any], he: torch.Tensor,
                      cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                      steps: int, structure: float, guidance: float, dtype: torch.dtype,
                      eta: Any, seeds: Sequence[int]) -> torch.Tensor:
    """HistDiST's recipe on PixCell: DDIM-invert the H&E tile's latent `latents` (normalised)
    under its own tokens `he` through the first `structure` of a `steps`-step schedule, then
    DDIM-denoise from there under the IHC tokens `cond` (with guidance), η from `eta` (a
    schedule over the denoising run). Costs ceil(structure x steps) inversion passes (one
    conditional pass each) on top of as many denoising steps."""
    import math

    from diffusers import DDIMScheduler

    from stainctl.engines.ddim import TileNoise, denoise_step, eta_at, invert_step

    ddim = DDIMScheduler.from_config({k: v for k, v in scheduler_config.items()
                                      if k in ("num_train_timesteps", "beta_start", "beta_end",
                                               "beta_schedule", "trained_betas")})
    device = latents.device
    alphas = ddim.alphas_cumprod.to(device)
    grid = _inversion_grid(scheduler_config, steps)
    k = max(1, math.ceil(structure * steps - 1e-9))
    ts = grid[:k]  # from the clean end up
    channels, b = latents.shape[1], latents.shape[0]
    noise = TileNoise(seeds)
    one = torch.ones((), device=device)

    def predict(x: torch.Tensor, t: int, tokens: torch.Tensor, scale: float) -> torch.Tensor:
        guided = scale > 1.0
        inp = torch.cat([x, x]) if guided else x
        toks = torch.cat([tokens, uncond.expand(b, -1, -1)]) if guided else tokens
        timestep = torch.full((inp.shape[0],), t, device=device)
        with autocast(device, dtype):
            out = transformer(inp, encoder_hidden_states=toks.to(device), timestep=timestep,
                              return_dict=False)[0]
        eps = out[:, :channels].float()
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        return eps

    x = latents.float()
    a_from = one
    for t in ts:  # the H&E tokens alone: the inversion follows the tile's own content
        x = invert_step(x, predict(x, t, he, 1.0), a_from, alphas[t], "epsilon")
        a_from = alphas[t]
    for i, t in enumerate(reversed(ts)):
        a_prev = alphas[ts[k - 2 - i]] if i < k - 1 else one
        value = eta_at(eta, i, k)
        drawn = noise.draw(x.shape[1:]).to(device) if value > 0 else None
        x = denoise_step(x, predict(x, t, cond, guidance), alphas[t], a_prev, "epsilon", value,
                         drawn)
    return x


@torch.no_grad()
def encode_latents(vae: Any, tiles: torch.Tensor, dtype: torch.dtype,
                   chunk: int = 4) -> torch.Tensor:
    """Normalised latents (the posterior means) of uint8 (B, H, W, 3) tiles on the VAE's device,
    the inverse of `decode_latents`."""
    from stainctl.engines.pixcell.config import LatentScaling

    scaling = LatentScaling.of(vae.config)
    out = []
    for part in tiles.split(chunk):
        img = part.permute(0, 3, 1, 2).float() / 127.5 - 1
        with autocast(img.device, dtype):
            mean = vae.encode(img, return_dict=False)[0].mean
        out.append(scaling.normalise(mean.float()))
    return torch.cat(out)
