"""The fast trainer's losses: a PatchGAN discriminator, the unpaired terms (structure, DAB
statistics, glass) and the misalignment-robust paired terms."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stainctl.stain.deconvolution import dab_density_torch
from stainctl.stain.tissue import glass_mask_torch


class PatchDiscriminator(nn.Module):
    """70-px receptive field PatchGAN (no normalisation on the first layer)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.GroupNorm(8, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 4, 1, 1), nn.GroupNorm(8, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.net(x))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each LeakyReLU (for feature matching)."""
        out = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out


def lowres_l1(fake: torch.Tensor, target: torch.Tensor, factor: int) -> torch.Tensor:
    """L1 after average pooling by `factor`: a shift much smaller than `factor` px barely
    changes it, a wrong stain does."""
    size = (max(1, fake.shape[-2] // factor), max(1, fake.shape[-1] // factor))
    return (F.adaptive_avg_pool2d(fake, size) - F.adaptive_avg_pool2d(target, size)).abs().mean()


def feature_matching(disc: PatchDiscriminator, fake: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    """Distance of the discriminator's per-channel feature statistics (spatial mean and std),
    which do not depend on where in the crop things are."""
    loss = fake.new_zeros(())
    with torch.no_grad():
        ref = disc.features(target)
    for a, b in zip(disc.features(fake), ref, strict=True):
        loss = loss + (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs().mean() \
            + (a.std(dim=(2, 3)) - b.std(dim=(2, 3))).abs().mean()
    return loss / len(ref)


def dab_stats_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean and spread of the DAB density (the evaluation's own deconvolution) of generated
    against real IHC."""
    a, b = dab_density_torch(fake), dab_density_torch(real)
    return (a.mean() - b.mean()).abs() + (a.std() - b.std()).abs()


def glass_loss(fake: torch.Tensor, he: torch.Tensor) -> torch.Tensor:
    """Mean L1 between output and input over the H&E's glass pixels (`stain.tissue`: bright and
    unstained); images in [-1, 1]."""
    mask = glass_mask_torch(he).float()
    return ((fake - he).abs() * mask).sum() / (3 * mask.sum()).clamp_min(1.0)


def edges(x: torch.Tensor) -> torch.Tensor:
    grey = x.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device) / 4
    k = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(grey, k, padding=1)
    # Normalised per image: stains change contrast, structure should stay.
    return g / (g.flatten(1).std(dim=1)[:, None, None, None] + 1e-6)
