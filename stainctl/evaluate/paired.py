"""Paired comparisons of a generated image with the real stain of the same tissue.

Real and virtual IHC come from serial sections at best, 10-50 px apart at 0.5 µm/px, so pixel
metrics at full resolution mostly measure the misalignment; they are reported with that caveat
and again at a reduced resolution where small shifts matter less. Where both images have
landmarks (ANHIR-style CSVs beside them), the generated image is registered onto the real one
with an affine transform first.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
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


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    """Landmark id -> (x, y) from an ANHIR CSV (`,X,Y` header, first column the id)."""
    out = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip().upper() for h in header[1:3]] != ["X", "Y"]:
            raise UsageError(f"{path}: not a landmark CSV (expected the columns ',X,Y')")
        for row in reader:
            if len(row) >= 3:
                out[row[0].strip()] = np.array([float(row[1]), float(row[2])])
    return out


def landmarks_beside(image: Path) -> Path | None:
    csv_path = image.with_suffix(".csv")
    return csv_path if csv_path.is_file() else None


@dataclass(frozen=True)
class Registration:
    matrix: np.ndarray  # 3x3 affine, fake (moving) -> real (fixed) pixel coordinates
    landmarks: int
    error_before: float  # mean landmark distance in px, unregistered
    error_after: float  # mean leave-one-out landmark distance in px, registered
    diagonal: float  # of the real image, to read the errors relative to it (ANHIR's rTRE)


def register_landmarks(fixed: dict[str, np.ndarray], moving: dict[str, np.ndarray],
                       fixed_shape: tuple[int, int]) -> Registration:
    """Affine registration of the moving image's landmarks onto the fixed ones. The error after
    is leave-one-out: each landmark is predicted by a transform fitted without it."""
    from skimage.transform import AffineTransform

    ids = sorted(set(fixed) & set(moving), key=lambda k: (len(k), k))
    if len(ids) < 4:
        raise UsageError(f"registration needs at least 4 shared landmarks, found {len(ids)}")
    dst = np.array([fixed[i] for i in ids])
    src = np.array([moving[i] for i in ids])
    full = AffineTransform.from_estimate(src, dst)
    errors = []
    for k in range(len(ids)):
        keep = np.arange(len(ids)) != k
        t = AffineTransform.from_estimate(src[keep], dst[keep])
        errors.append(float(np.linalg.norm(t(src[k:k + 1])[0] - dst[k])))
    before = float(np.linalg.norm(src - dst, axis=1).mean())
    h, w = fixed_shape
    return Registration(np.asarray(full.params), len(ids), before, float(np.mean(errors)),
                        float(np.hypot(h, w)))


def warp_onto(moving: np.ndarray, matrix: np.ndarray,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The moving image in the fixed image's frame, and the mask of pixels it covers."""
    import cv2

    h, w = shape
    m = matrix[:2].astype(np.float64)
    warped = cv2.warpAffine(moving, m, (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    mask = cv2.warpAffine(np.full(moving.shape[:2], 255, np.uint8), m, (w, h),
                          flags=cv2.INTER_NEAREST, borderValue=0) > 0
    return warped, mask


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
