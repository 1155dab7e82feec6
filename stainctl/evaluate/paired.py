"""Paired comparisons of a generated image with the real stain of the same tissue.

Real and virtual IHC come from serial sections at best, 10-50 px apart at 0.5 µm/px, so pixel
metrics at full resolution mostly measure the misalignment; they are reported with that caveat
and again at a reduced resolution where small shifts matter less. Where both images have
landmarks (ANHIR-style CSVs beside them), the generated image is registered onto the real one
with an affine transform first (`stainctl.slide.registration`, which the trainer's pairs use too).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from stainctl.errors import UsageError

CAVEAT = ("serial sections are not the same cells: paired SSIM/PSNR measure alignment as much as "
          "staining; read them at reduced resolution and after registration")
PSNR_CAP = 100.0  # dB, reported for identical images
REDUCED = 4  # the reduced-resolution comparison is at 1/REDUCED of the size


def pairs_from_csv(csv_path: Path) -> list[tuple[str, str]]:
    """(real, fake) rows of a CSV with `real,fake` columns (header optional); paths are
    relative to the CSV."""
    rows = []
    with open(csv_path, newline="") as fh:
        for row in csv.reader(fh):
            if not row or row[0].strip().startswith("#"):
                continue
            if len(row) < 2:
                raise UsageError(f"{csv_path}: each row needs two columns, real and fake")
            if row[0].strip().lower() == "real" and row[1].strip().lower() == "fake":
                continue
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise UsageError(f"{csv_path}: no pairs in this CSV")
    return rows


def compare(real: np.ndarray, fake: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """SSIM and PSNR at full and at 1/REDUCED resolution, over `mask` where given. A fake of
    another size is resized onto the real one (unregistered pairs)."""
    import cv2

    h, w = real.shape[:2]
    if fake.shape[:2] != (h, w):
        fake = cv2.resize(fake, (w, h), interpolation=cv2.INTER_AREA)
    if mask is None:
        mask = np.ones((h, w), bool)
    out = {}
    for name, factor in (("full", 1), ("reduced", REDUCED)):
        a, b, m = real, fake, mask
        if factor > 1:
            size = (max(8, w // factor), max(8, h // factor))
            a = cv2.resize(real, size, interpolation=cv2.INTER_AREA)
            b = cv2.resize(fake, size, interpolation=cv2.INTER_AREA)
            m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        out[f"ssim_{name}"], out[f"psnr_{name}"] = _ssim_psnr(a, b, m)
    return out


def _ssim_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    if not mask.any():
        return float("nan"), float("nan")
    win = min(7, *(s - (1 - s % 2) for s in a.shape[:2]))
    _, smap = structural_similarity(a, b, channel_axis=2, data_range=255, full=True,
                                    win_size=max(3, win))
    ssim = float(smap[mask].mean())
    mse = float(np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2))
    # Identical images have an infinite PSNR; cap it so means and JSON stay finite.
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, float(10 * np.log10(255.0 ** 2 / mse)))
    return ssim, psnr
