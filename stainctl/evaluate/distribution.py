"""FID, KID and the encoder-space proxies, computed with torchmetrics from stored features.

Features are extracted once per image (or crop) and fed to torchmetrics through an identity
"feature extractor", so FID and KID on the same crop stream share one Inception pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KID_SUBSETS = 50
KID_MAX_SUBSET = 100


def _passthrough(dim: int) -> Any:
    import torch

    class Features(torch.nn.Module):
        """Identity: the "images" given to the metric are already features."""

        num_features = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return Features()


def _metric_input(features: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (FID when the
    features are Inception pool3)."""
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_passthrough(real.shape[1]))
    metric.update(_metric_input(real), real=True)
    metric.update(_metric_input(fake), real=False)
    return max(0.0, float(metric.compute()))


def kernel_distance(real: np.ndarray, fake: np.ndarray, seed: int) -> tuple[float, float]:
    """KID mean and std over 50 subsets of min(N, 100) features (the CK7 study's setting),
    with subsets drawn from a generator seeded by `seed`."""
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    import warnings

    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(len(real), len(fake), KID_MAX_SUBSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all features": it must
        metric = KernelInceptionDistance(feature=_passthrough(real.shape[1]),
                                         subsets=KID_SUBSETS, subset_size=size)
    metric.update(_metric_input(real), real=True)
    metric.update(_metric_input(fake), real=False)
    # torchmetrics draws the subsets from the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def cosine_of_means(real: np.ndarray, fake: np.ndarray) -> float:
    """Cosine similarity of the mean real and mean generated embedding (the CK7 study's cheap
    proxy for how IHC-like the generated set is, in encoder space)."""
    a, b = real.mean(axis=0), fake.mean(axis=0)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": len(values)}
