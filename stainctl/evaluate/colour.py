"""Colour metrics (`evaluate --metrics colour`): what stain normalisation changes.

Per set: the mean and spread of its tissue pixels in CIE Lab, and its haematoxylin and eosin
stain vectors estimated by Macenko's method on those pixels (torchstain's fit, with the stain
plane through zero density: normalize/macenko.py). Between a set and the
real (target) set: the distance of the Lab means (ΔE), of the spreads, both together (the "Lab
distance"), and the angle between the stain vectors. Normalising slides to a target should bring
their Lab distance and stain angles down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

PIXELS_PER_IMAGE = 20_000  # tissue pixels kept per image (seeded)


def colour_pixels(image: NDArray[np.uint8], seed: int
                  ) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """A seeded sample of one image's tissue pixels, and one of all its pixels, (N, 3) uint8."""
    from stainctl.normalize.sample import tissue_pixels

    rng = np.random.default_rng(seed)
    flat = image[..., :3].reshape(-1, 3)
    everything = flat[rng.choice(len(flat), min(len(flat), PIXELS_PER_IMAGE // 4),
                                 replace=False)]
    px = image[..., :3][tissue_pixels(image)]
    if len(px) > PIXELS_PER_IMAGE:
        px = px[rng.choice(len(px), PIXELS_PER_IMAGE, replace=False)]
    return np.ascontiguousarray(px), np.ascontiguousarray(everything)


@dataclass(frozen=True, kw_only=True)
class ColourStats:
    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    stain_matrix: tuple[tuple[float, float], ...] | None  # 3 x 2: OD of H, E per RGB channel
    pixels: int

    def as_dict(self) -> dict[str, Any]:
        h_e = None if self.stain_matrix is None else {
            "haematoxylin": [row[0] for row in self.stain_matrix],
            "eosin": [row[1] for row in self.stain_matrix]}
        return {"lab_mean": list(self.lab_mean), "lab_std": list(self.lab_std),
                "stain_vectors": h_e, "tissue_pixels": self.pixels}


def lab(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    import cv2

    return cv2.cvtColor((pixels.reshape(1, -1, 3).astype(np.float32) / 255),
                        cv2.COLOR_RGB2Lab)[0]


def colour_stats(pixels: NDArray[np.uint8] | Sequence[NDArray[np.uint8]],
                 name: str = "set") -> ColourStats:
    """Lab mean and spread and Macenko stain vectors of tissue pixels (None where the stains
    cannot be estimated: too few or too pale pixels)."""
    from stainctl.errors import UsageError
    from stainctl.normalize.classical import fit_stains
    from stainctl.normalize.sample import StainSample

    px = pixels if isinstance(pixels, np.ndarray) else (
        np.concatenate(list(pixels)) if len(pixels) else np.zeros((0, 3), np.uint8))
    values = lab(px) if len(px) else np.zeros((0, 3), np.float32)
    mean = values.mean(axis=0) if len(px) else np.full(3, np.nan)
    std = values.std(axis=0) if len(px) else np.full(3, np.nan)
    matrix = None
    if len(px) >= 100:
        try:
            fit = fit_stains("macenko", StainSample(pixels=px, glass=(240, 240, 240), name=name))
            matrix = tuple((float(r[0]), float(r[1])) for r in fit["stain_matrix"])
        except UsageError:
            matrix = None
    m0, m1, m2 = (float(v) for v in mean)
    s0, s1, s2 = (float(v) for v in std)
    return ColourStats(lab_mean=(m0, m1, m2), lab_std=(s0, s1, s2), stain_matrix=matrix,
                       pixels=len(px))


def colour_distance(a: ColourStats, b: ColourStats) -> dict[str, float | None]:
    """How far set `a`'s colours are from set `b`'s."""
    dm = float(np.linalg.norm(np.subtract(a.lab_mean, b.lab_mean)))
    ds = float(np.linalg.norm(np.subtract(a.lab_std, b.lab_std)))
    out: dict[str, float | None] = {"lab_mean_distance": dm, "lab_std_distance": ds,
                                    "lab_distance": float(np.hypot(dm, ds)),
                                    "haematoxylin_angle": None, "eosin_angle": None}
    if a.stain_matrix is not None and b.stain_matrix is not None:
        ma, mb = np.asarray(a.stain_matrix), np.asarray(b.stain_matrix)
        for i, key in enumerate(("haematoxylin_angle", "eosin_angle")):
            cos = float(ma[:, i] @ mb[:, i] / (np.linalg.norm(ma[:, i]) * np.linalg.norm(mb[:, i])))
            out[key] = float(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    return out


def check_target(pixels: Sequence[NDArray[np.uint8]], everything: Sequence[NDArray[np.uint8]],
                 name: str) -> None:
    """The real set as a colour target (`pixels`: its tissue pixels, `everything`: a sample of
    all its pixels): refused when uniform, only glass, or without haematoxylin (UsageError,
    exit 2), as `normalize --target` refuses such a reference."""
    from stainctl.normalize.sample import StainSample, check_reference

    px = np.concatenate(list(pixels)) if pixels else np.zeros((0, 3), np.uint8)
    flat = np.concatenate(list(everything)) if everything else np.zeros((0, 3), np.uint8)
    check_reference(StainSample(pixels=px, glass=(240, 240, 240), name=name), flat[None],
                    fix="--real")
