"""HistDiST's inference loops on batches: DDIM inversion of the H&E latent under the "H&E" text
prompt (image channels zero), then DDIM translation under Phikon tokens with the H&E latent
concatenated to every UNet input, η following a schedule. One UNet pass per step for the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stainctl.engines.ddim import TileNoise, eta_at, invert_step


def _unet(unet: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
    timestep = t.expand(x.shape[0]).to(x.device)
    out = unet(x.to(dtype), timestep, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
    return out.float()


@torch.no_grad()
def invert(unet: Any, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor, steps: int,
           eta: Callable[[float], float], noise: TileNoise, dtype: torch.dtype,
           normalise_steps: bool = False) -> torch.Tensor:
    """Noise latents from clean `latents` (B, C, h, w), `scheduler` a DDIMInverseScheduler:
    the published inversion (the model is evaluated at the target timestep on the current
    latent; the image channels are zero, as the authors invert under the text prompt)."""
    scheduler.set_timesteps(steps, device=latents.device)
    alphas = scheduler.alphas_cumprod.to(latents.device)
    total = scheduler.config.num_train_timesteps
    x = latents.float()
    extra = torch.zeros_like(x)
    for i, t in enumerate(scheduler.timesteps):
        t_from = min(int(t) - total // steps, total - 1)
        a_from = alphas[t_from] if t_from >= 0 else scheduler.initial_alpha_cumprod.to(x.device)
        inp = torch.cat([scheduler.scale_model_input(x, t), extra], dim=1)
        out = _unet(unet, inp, t, cond, dtype)
        value = eta_at(eta, i, steps)
        drawn = noise.draw(x.shape[1:]).to(x.device) if value > 0 else None
        x = invert_step(x, out, a_from, alphas[int(t)], scheduler.config.prediction_type,
                        value, drawn, normalise_steps)
    return x


@torch.no_grad()
def denoise(unet: Any, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor,
            image: torch.Tensor, steps: int, eta: Callable[[float], float], noise: TileNoise,
            dtype: torch.dtype) -> torch.Tensor:
    """Clean latents from noise `latents`, `scheduler` a DDIMScheduler; `image`: the latents
    concatenated to every UNet input (the H&E latent; zeros for the generation task)."""
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents.float()
    for i, t in enumerate(scheduler.timesteps):
        inp = torch.cat([scheduler.scale_model_input(x, t), image.float()], dim=1)
        out = _unet(unet, inp, t, cond, dtype)
        value = eta_at(eta, i, steps)
        drawn = noise.draw(x.shape[1:]).to(x.device) if value > 0 else None
        x = scheduler.step(out, t, x, eta=value, variance_noise=drawn,
                           return_dict=False)[0]
    return x


