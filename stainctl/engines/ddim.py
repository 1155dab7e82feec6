"""Deterministic DDIM inversion and η-scheduled DDIM denoising, shared by the diffusion engines.

HistDiST's recipe (arXiv 2505.06793): run DDIM backwards from a clean latent to noise (inversion,
η = 0, so the noise encodes the image's structure), then denoise from that noise under another
condition with η following a schedule over the run (x = 0 at the first step, 1 at the last): noise
injected early frees the stain, little late keeps the cells where they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from stainctl.errors import UsageError

if TYPE_CHECKING:  # torch is imported where it is used: options check without it
    import torch

# The published schedules (HistDiST inference script); "cosine-20" is its translation default.
ETA_SCHEDULES: dict[str, Callable[[float], float]] = {
    "zero": lambda x: 0.0,
    "constant": lambda x: 0.1,
    "linear": lambda x: x,
    "cosine-10": lambda x: 0.55 - 0.45 * math.cos(math.pi * x),
    "cosine-20": lambda x: 0.6 - 0.4 * math.cos(math.pi * x),
    "cosine-30": lambda x: 0.65 - 0.35 * math.cos(math.pi * x),
}
PREDICTIONS = ("v_prediction", "epsilon")


def eta_schedule(name: str) -> Callable[[float], float]:
    """A named schedule, or a number for a constant η; values are clipped to [0, 1] at use."""
    if name in ETA_SCHEDULES:
        return ETA_SCHEDULES[name]
    try:
        value = float(name)
    except ValueError:
        raise UsageError(f"an η schedule is one of {', '.join(ETA_SCHEDULES)} or a number in "
                         f"[0, 1], got {name!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"a constant η must be in [0, 1], got {name}")
    return lambda x: value


def eta_at(schedule: Callable[[float], float], i: int, n: int) -> float:
    x = i / (n - 1) if n > 1 else 0.0
    return max(min(float(schedule(x)), 1.0), 0.0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per sample and channel (HistDiST's normalisation of the inverted
    latent, which puts it back on the noise distribution the denoiser starts from)."""
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def split_output(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                 prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted clean sample, predicted noise) from a model output at cumulative alpha."""
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction == "epsilon":
        return (x - b * out) / a, out
    if prediction == "v_prediction":
        return a * x - b * out, a * out + b * x
    raise UsageError(f"prediction type must be one of {', '.join(PREDICTIONS)}, "
                     f"got {prediction!r}")


def invert_step(x: torch.Tensor, out: torch.Tensor, alpha_from: torch.Tensor,
                alpha_to: torch.Tensor, prediction: str, eta: float = 0.0,
                noise: torch.Tensor | None = None, normalise: bool = False) -> torch.Tensor:
    """One DDIM step up the noise scale, from cumulative alpha `alpha_from` (less noise) to
    `alpha_to`, with the model output `out` evaluated at the target timestep (the published
    inversion: DDIM's update read backwards, with the optional η noise and per-step
    standardisation of its script)."""
    x0, eps = split_output(out, x, alpha_from, prediction)
    variance = (1 - alpha_from) / (1 - alpha_to) * (1 - alpha_to / alpha_from)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - alpha_to - std ** 2).clamp(min=0).sqrt() * eps if eta > 0 else \
        (1 - alpha_to).sqrt() * eps
    x = alpha_to.sqrt() * x0 + direction
    if normalise:
        x = standardise(x)
    if eta > 0 and noise is not None:
        x = x + std * noise
    return x


def denoise_step(x: torch.Tensor, out: torch.Tensor, alpha_t: torch.Tensor,
                 alpha_prev: torch.Tensor, prediction: str, eta: float = 0.0,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step down the noise scale (diffusers' DDIMScheduler.step without clipping)."""
    x0, eps = split_output(out, x, alpha_t, prediction)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    x = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        x = x + std * noise
    return x


class TileNoise:
    """Gaussian noise drawn from one generator per tile, in the order asked: a tile gets the same
    noise whatever batch it is in, so a resumed run repeats an uninterrupted one."""

    def __init__(self, seeds: Sequence[int]) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        import torch

        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
