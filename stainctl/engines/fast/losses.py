"""The fast trainer's losses: a PatchGAN discriminator, the unpaired terms (structure, DAB
statistics and upper tail, glass, and the counterstain terms: haematoxylin statistics, DAB
confined to nuclei, pale background) and the misalignment-robust paired terms."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from stainctl.stain.deconvolution import dab_density_torch, off_stain_residual_torch
from stainctl.stain.tissue import TISSUE_BELOW, glass_mask_torch

DAB_POSITIVE = 0.15  # DAB optical density counted as positive (as `evaluate --metrics stain`)


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


def tissue_mask_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: tissue pixels (`stain.tissue`'s rule) of images in [-1, 1]."""
    return x.mean(dim=1) < TISSUE_BELOW / 127.5 - 1


def nuclei_mask_torch(hed: torch.Tensor, tissue: torch.Tensor, with_dab: bool,
                      size: int = 5, quantile: float = 0.6,
                      floor: float = 0.04) -> torch.Tensor:
    """(B, H, W) bool: nuclei-shaped structures, from `hed` (B, H, W, 3) stain densities.

    Dense haematoxylin (plus DAB in an IHC, whose positive nuclei are brown) above each image's
    `quantile` of its tissue (at least `floor`), then a morphological opening by a `size`-px
    square: at 0.5 µm/px a nucleus (5-10 µm) survives it, a fibre or membrane 1-2 µm thin does
    not. Not a segmentation, a mask for where DAB may go."""
    signal = hed[..., 0] + hed[..., 2] if with_dab else hed[..., 0]
    signal = signal.detach()
    thresholds = []
    for s, t in zip(signal, tissue, strict=True):
        values = s[t]
        q = torch.quantile(values.float(), quantile) if values.numel() else s.new_tensor(floor)
        thresholds.append(q.clamp_min(floor))
    mask = ((signal > torch.stack(thresholds)[:, None, None]) & tissue).float()[:, None]
    pad = size // 2
    eroded = -F.max_pool2d(-mask, size, 1, pad)
    return F.max_pool2d(eroded, size, 1, pad)[:, 0] > 0.5


def _masked_mean_std(v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of `v` over `mask` (both (B, H, W), pooled over the batch)."""
    w = mask.float()
    n = w.sum().clamp_min(1.0)
    mean = (v * w).sum() / n
    var = (((v - mean) ** 2) * w).sum() / n
    return mean, (var + 1e-8).sqrt()


def dab_tail_loss(fake_dab: torch.Tensor, real_dab: torch.Tensor) -> torch.Tensor:
    """What `evaluate --metrics stain` reports, made differentiable: the per-image "p90" (mean of
    the top decile of DAB) and the DAB-positive area (a soft count above DAB_POSITIVE), batch
    means of generated against real."""
    def tail(d: torch.Tensor) -> torch.Tensor:
        flat = d.flatten(1)
        return flat.topk(max(1, flat.shape[1] // 10), dim=1).values.mean()

    def positive(d: torch.Tensor) -> torch.Tensor:
        # A soft edge wide enough to pull up DAB still well below the threshold.
        return torch.sigmoid((d - DAB_POSITIVE) / 0.03).mean()

    return (tail(fake_dab) - tail(real_dab.detach())).abs() \
        + (positive(fake_dab) - positive(real_dab.detach())).abs()


def dab_upper_loss(fake_dab: torch.Tensor, real_dab: torch.Tensor,
                   fraction: float = 0.03) -> torch.Tensor:
    """L1 between the sorted top `fraction` of each image's DAB (averaged rank by rank over the
    batch), generated against real: the shape of the upper tail, not only its mean. The
    top-decile mean and a soft area can both be matched by DAB piled up just below
    DAB_POSITIVE (olive nuclei, almost nothing counted positive, issue 22); rank-by-rank
    matching pulls the strongest pixels up to the real IHC's brown."""
    def upper(d: torch.Tensor) -> torch.Tensor:
        flat = d.flatten(1)
        return flat.topk(max(1, int(flat.shape[1] * fraction)), dim=1).values.mean(dim=0)

    return (upper(fake_dab) - upper(real_dab.detach())).abs().mean()


def haematoxylin_stats_loss(fake_hed: torch.Tensor, fake_tissue: torch.Tensor,
                            real_hed: torch.Tensor, real_tissue: torch.Tensor) -> torch.Tensor:
    """Mean and spread of the haematoxylin density over DAB-negative tissue, generated against
    real: the counterstain is blue-grey, not the brown of a browned H&E."""
    fake_mask = fake_tissue & (fake_hed[..., 2].detach() < DAB_POSITIVE)
    real_mask = real_tissue & (real_hed[..., 2] < DAB_POSITIVE)
    fm, fs = _masked_mean_std(fake_hed[..., 0], fake_mask)
    rm, rs = _masked_mean_std(real_hed[..., 0].detach(), real_mask)
    return (fm - rm).abs() + (fs - rs).abs()


def dab_outside_nuclei_loss(fake_dab: torch.Tensor, fake_nuclei: torch.Tensor,
                            fake_tissue: torch.Tensor, real_dab: torch.Tensor,
                            real_nuclei: torch.Tensor, real_tissue: torch.Tensor) -> torch.Tensor:
    """DAB above what the real IHC has outside its nuclei (its 90th percentile there), on the
    generated image's tissue outside the input's nuclei: a nuclear marker browns nuclei, not
    stroma, cytoplasm or fibres."""
    background = real_dab.detach()[real_tissue & ~real_nuclei]
    level = torch.quantile(background.float(), 0.9) if background.numel() else \
        real_dab.new_tensor(DAB_POSITIVE)
    mask = (fake_tissue & ~fake_nuclei).float()
    return (F.relu(fake_dab - level) * mask).sum() / mask.sum().clamp_min(1.0)


def background_colour_loss(fake: torch.Tensor, fake_mask: torch.Tensor, real: torch.Tensor,
                           real_mask: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and spread of the colour of non-nuclear tissue, generated against real:
    pale stroma and cytoplasm, and no colour on fibres that the targets do not have."""
    loss = fake.new_zeros(())
    for c in range(3):
        fm, fs = _masked_mean_std(fake[:, c], fake_mask)
        rm, rs = _masked_mean_std(real[:, c].detach(), real_mask)
        loss = loss + (fm - rm).abs() + (fs - rs).abs()
    return loss / 3


def off_stain_loss(fake: torch.Tensor, fake_tissue: torch.Tensor, real: torch.Tensor,
                   real_tissue: torch.Tensor) -> torch.Tensor:
    """Colour outside the haematoxylin-DAB plane on generated tissue, per pixel beyond the 95th
    percentile of the real IHC's: every colour of an H-DAB slide is a mix of blue and brown, so
    green nuclei or pink fibres (which the other stain terms, reading only the H and DAB
    channels, do not see) are penalised where they are, however few."""
    with torch.no_grad():
        real_res = off_stain_residual_torch(real)[real_tissue]
        level = torch.quantile(real_res.float(), 0.95) if real_res.numel() else \
            real.new_tensor(0.0)
    w = fake_tissue.float()
    return (F.relu(off_stain_residual_torch(fake) - level) * w).sum() / w.sum().clamp_min(1.0)


def optical_density_torch(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) per-channel optical density -ln(I) of (B, 3, H, W) images in [-1, 1], the
    intensity floored at 1/255 (a uint8 image's darkest step): glass ~0, blue and brown apart."""
    return -torch.log(((x + 1) / 2).clamp(1 / 255, 1)).permute(0, 2, 3, 1)


def _directions(count: int = 16) -> torch.Tensor:
    """(3, count) unit vectors: the three channel axes, the haematoxylin and DAB density
    directions of the colour deconvolution (one slice each that reads hue: a nucleus either
    blue or brown, not olive in between), then a fixed seeded set over the whole sphere (the
    same every step and run, so the loss does not draw from the training RNG). Directions in
    the positive octant alone would mostly read darkness, and match the darkest H&E nuclei to
    the targets' darkest (brown) pixels whatever their hue."""
    from stainctl.stain.deconvolution import hed_from_rgb

    stains = torch.as_tensor(hed_from_rgb()[:, [0, 2]].T, dtype=torch.float32)
    g = torch.Generator().manual_seed(22)
    v = torch.cat([torch.eye(3), stains, torch.randn(count - 5, 3, generator=g)])
    return (v / v.norm(dim=1, keepdim=True)).T


DIRECTIONS = _directions()


def colour_distribution_loss(fake_od: torch.Tensor, fake_mask: torch.Tensor,
                             real_od: torch.Tensor, real_mask: torch.Tensor,
                             quantiles: int = 128) -> torch.Tensor:
    """Sliced Wasserstein-1 distance between the optical densities (B, H, W, 3) of the
    generated pixels under `fake_mask` and of the real ones under `real_mask` (both (B, H, W),
    pooled over the batch): each pixel set projected on DIRECTIONS, sorted, and compared at
    `quantiles` evenly spaced ranks. It needs no pairing and matches the whole colour
    distribution, not only its mean: asked of nuclei, it wants mostly blue ones and the
    targets' fraction of brown, in the targets' hue (brown, not yellow). Zero when either set
    is empty."""
    a, b = fake_od[fake_mask], real_od.detach()[real_mask]
    if a.shape[0] < 2 or b.shape[0] < 2:
        return fake_od.new_zeros(())
    d = DIRECTIONS.to(device=fake_od.device, dtype=fake_od.dtype)
    ranks = torch.linspace(0, 1, quantiles, device=fake_od.device)
    pa = (a @ d).sort(dim=0).values[(ranks * (a.shape[0] - 1)).round().long()]
    pb = (b @ d).sort(dim=0).values[(ranks * (b.shape[0] - 1)).round().long()]
    return (pa - pb).abs().mean()
