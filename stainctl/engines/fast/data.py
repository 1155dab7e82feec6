"""The fast trainer's data: whole images at the training resolution, a held-out strip of each IHC
image for evaluation, random tissue crops, and registered H&E/IHC pairs of serial sections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from stainctl.stain.tissue import MIN_TISSUE, is_tissue_crop


def load_image(path: str | Path, mpp: float, default_mpp: float | None = None) -> np.ndarray:
    """A whole (small) image or slide at `mpp` µm/px, RGB uint8."""
    import cv2

    from stainctl.slide.reader import open_slide

    slide = open_slide(Path(path))
    if slide.mpp is None and default_mpp is not None:
        slide.close()
        slide = open_slide(Path(path), default_mpp)
    try:
        src_mpp = slide.require_mpp()
        level = slide.best_level(mpp / src_mpp)
        w, h = slide.level_dimensions[level]
        rgb = slide.read_region(0, 0, level, w, h)
        scale = src_mpp * slide.level_downsamples[level] / mpp
    finally:
        slide.close()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def hold_out(image: np.ndarray, fraction: float, crop: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training part, held-out part) of one image: a right-hand strip a whole number of crops
    wide (about `fraction` of the width, at least one crop) is held out, so no training crop
    overlaps an evaluation crop. An image too narrow to keep a crop on each side is not split."""
    if fraction <= 0:
        return image, None
    width = image.shape[1]
    strip = crop * max(1, round(fraction * width / crop))
    if width - strip < crop:
        return image, None
    return image[:, :width - strip], image[:, width - strip:]


def validation_split(image: np.ndarray, fraction: float,
                     crop: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training part, validation part) of one image: as `hold_out`, but a bottom strip whole
    crops tall. Applied to what `hold_out` left, it gives a validation set that overlaps neither
    training nor the held-out crops: checkpoints are chosen on it, and the held-out numbers
    stay unbiased."""
    kept, strip = hold_out(image.swapaxes(0, 1), fraction, crop)
    return kept.swapaxes(0, 1), None if strip is None else strip.swapaxes(0, 1)


def tissue_origins(image: np.ndarray, crop: int,
                   min_tissue: float = MIN_TISSUE) -> list[tuple[int, int]]:
    """(y, x) of the non-overlapping `crop`-px squares of an image, row by row, that are mostly
    tissue (the training sampler's own rule)."""
    return [(y, x) for y in range(0, image.shape[0] - crop + 1, crop)
            for x in range(0, image.shape[1] - crop + 1, crop)
            if is_tissue_crop(image[y:y + crop, x:x + crop], min_tissue)]


def held_out_crops(strip: np.ndarray, crop: int,
                   min_tissue: float = MIN_TISSUE) -> list[np.ndarray]:
    """Non-overlapping `crop`-px squares of a held-out strip, top to bottom, that are mostly
    tissue (the training sampler's own rule)."""
    return [strip[y:y + crop, x:x + crop] for y, x in tissue_origins(strip, crop, min_tissue)]


Split = Callable[[np.ndarray, float, int], tuple[np.ndarray, np.ndarray | None]]


def write_held_out(ihc: dict[str, np.ndarray], fraction: float, crop: int,
                   folder: Path, split: Split = hold_out) -> dict[str, np.ndarray]:
    """Split each named IHC image (`hold_out`, or `validation_split`), write the crops of the
    part kept out as PNGs (`<name>_<k>.png`) into `folder` for `stainctl evaluate --real`, and
    return the training parts."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):  # from a run with another split
        stale.unlink()
    kept = {}
    for name, image in ihc.items():
        kept[name], strip = split(image, fraction, crop)
        for k, c in enumerate(held_out_crops(strip, crop) if strip is not None else []):
            if not cv2.imwrite(str(folder / f"{name}_{k}.png"), c[..., ::-1]):
                raise OSError(f"could not write {folder / f'{name}_{k}.png'}")
    return kept


class CropSampler:
    """Random square crops with flips and quarter turns, from a few whole images."""

    def __init__(self, images: Sequence[np.ndarray], crop: int, rng: np.random.Generator,
                 min_tissue: float = MIN_TISSUE) -> None:
        self.images = [im for im in images if min(im.shape[:2]) >= crop]
        if not self.images:
            raise ValueError(f"no image is at least {crop} px at the training resolution")
        self.crop, self.rng, self.min_tissue = crop, rng, min_tissue

    def sample(self, n: int) -> torch.Tensor:
        out: list[np.ndarray] = []
        while len(out) < n:
            im = self.images[self.rng.integers(len(self.images))]
            y = self.rng.integers(im.shape[0] - self.crop + 1)
            x = self.rng.integers(im.shape[1] - self.crop + 1)
            c = im[y:y + self.crop, x:x + self.crop]
            if not is_tissue_crop(c, self.min_tissue):
                continue  # mostly glass: teaches nothing
            c = np.rot90(c, int(self.rng.integers(4)))
            if self.rng.integers(2):
                c = c[:, ::-1]
            out.append(np.ascontiguousarray(c))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1


class PairSampler:
    """The same random crop (and flip, turn) of each aligned H&E/IHC pair: (H&E, IHC)."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], crop: int,
                 rng: np.random.Generator) -> None:
        stacked = []
        for he, ihc in pairs:
            if he.shape != ihc.shape:
                raise ValueError(f"a pair must have one shape, got {he.shape} and {ihc.shape}")
            stacked.append(np.concatenate([he, ihc], axis=2))
        self.sampler = CropSampler(stacked, crop, rng)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.sampler.sample(n)
        return both[:, :3], both[:, 3:]


def load_pair(he_path: str | Path, ihc_path: str | Path, mpp: float,
              default_mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An H&E image and the IHC of a serial section, in the H&E's frame at `mpp`: registered by
    an affine fit of their landmarks where ANHIR-style CSVs lie beside both (`,X,Y`, in the
    files' own pixels), else resized onto it. IHC pixels outside the section become glass."""
    import cv2

    from stainctl.slide.reader import open_slide
    from stainctl.slide.registration import (
        landmarks_beside,
        read_landmarks,
        register_landmarks,
        warp_onto,
    )

    he, ihc = load_image(he_path, mpp, default_mpp), load_image(ihc_path, mpp, default_mpp)
    lh, li = landmarks_beside(Path(he_path)), landmarks_beside(Path(ihc_path))
    if lh is None or li is None:
        return he, cv2.resize(ihc, (he.shape[1], he.shape[0]), interpolation=cv2.INTER_AREA)

    def scaled(csv: Path, image: Path, loaded: np.ndarray) -> dict[str, np.ndarray]:
        slide = open_slide(image, default_mpp)
        width = slide.dimensions[0]
        slide.close()
        return {k: v * loaded.shape[1] / width for k, v in read_landmarks(csv).items()}

    reg = register_landmarks(scaled(lh, Path(he_path), he), scaled(li, Path(ihc_path), ihc),
                             he.shape[:2])
    warped, inside = warp_onto(ihc, reg.matrix, he.shape[:2])
    warped[~inside] = 255
    return he, warped
