"""Macenko's stain estimate: torchstain's fit, with the stain plane through zero density.

torchstain (after HEnorm_python) follows Macenko et al. (ISBI 2009) with one departure: it takes
the haematoxylin/eosin plane from the eigenvectors of the *centred* covariance of the optical
densities (OD) of the stained pixels, i.e. the best plane through their mean. Reconstruction
then treats that plane as passing through the origin (OD = stains x amounts: Beer-Lambert, with
glass, no stain, at zero density), so the tissue's mean OD lies off it, and what lies off the
plane is lost when a pixel is rebuilt from its two stains. The paper's formulation ("compute the
singular value decomposition of the OD tuples, create a plane from the SVD directions
corresponding to the two largest singular values") is uncentred: the plane through zero density
that best fits the OD tuples, the two leading eigenvectors of their second-moment matrix.

`fit_macenko` is torchstain's fit with only that matrix changed: torchstain's own steps find
the stain vectors in the plane (the alpha / 100 - alpha percentiles of the angle), order them
(haematoxylin first) and solve the amounts (least squares; the 99th percentile is each stain's
maximum concentration), with torchstain's parameters (Io 240, alpha 1, beta 0.15).

Measured (bench/RESULTS.md, normalize, 2026-11-30 norm4): the CMU-1 sample's tissue rebuilt
from its own two stains is 9.6 Lab from itself with the centred plane and 3.7 with the plane
through zero; normalising CMU-1 to itself changes its tissue by 6.8 and 3.9 grey levels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

IO = 240.0  # the transmitted light, torchstain's default, for every slide (see classical.py)
ALPHA = 1.0  # percentile of the angle in the stain plane at which each stain's vector lies
BETA = 0.15  # optical density below which a channel counts as unstained (near glass)
PERCENTILE = 99  # torchstain's maximum concentration
PLANE = "origin"  # recorded with a fit (older fits, without it, used torchstain's centred plane)
MIN_STAINED = 100  # stained pixels a fit needs


def _torchstain() -> Any:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    return NumpyMacenkoNormalizer()


def stain_plane(od: NDArray[np.float64], centred: bool = False) -> NDArray[np.float64]:
    """(3, 3) eigenvectors, ascending, of the stained pixels' OD second moments: about the
    origin (Macenko 2009), or about their mean (`centred`, torchstain's np.cov)."""
    m = np.cov(od.T) if centred else od.T @ od / len(od)
    return np.linalg.eigh(m)[1]


def fit_macenko(pixels: NDArray[np.uint8], io: float = IO, centred: bool = False
                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The (3, 2) stain matrix (haematoxylin, eosin columns: unit OD vectors per RGB channel)
    and the two maximum concentrations of (N, 3) tissue pixels, by torchstain's steps on the
    plane `stain_plane` gives. ValueError where too few pixels are stained to estimate them."""
    norm = _torchstain()
    od = -np.log((pixels.reshape(-1, 3).astype(np.float64) + 1) / io)  # torchstain's rgb2od
    stained = od[~np.any(od < BETA, axis=1)]
    if len(stained) < MIN_STAINED:
        raise ValueError(f"{len(stained)} stained pixels, at least {MIN_STAINED} needed")
    # torchstain's private steps (name-mangled): the angle percentiles, the H-first order and
    # the least-squares amounts are its own; only the plane is given.
    he = norm._NumpyMacenkoNormalizer__find_HE(stained, stain_plane(stained, centred), ALPHA)
    amounts = norm._NumpyMacenkoNormalizer__find_concentration(od, he)
    return he, np.percentile(amounts, PERCENTILE, axis=1)
