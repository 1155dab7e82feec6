"""Landmark registration of two images of serial sections (ANHIR-style CSVs beside them).

Used by evaluation (a generated slide onto the real stain) and by the fast trainer (an IHC image
of a serial section onto its H&E): an affine fit of shared landmarks and a warp onto the fixed
image's frame.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stainctl.errors import UsageError


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
