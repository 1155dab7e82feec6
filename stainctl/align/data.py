"""train-align's data: registered H&E / IHC pairs cut into corresponding tiles, and the IHC
pattern class of each tile (from a readout measure of its IHC tile binned by `--classes`, or
from a labels CSV) and of each slide."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stainctl.errors import UsageError
from stainctl.stain.tissue import MIN_TISSUE, is_tissue_crop

if TYPE_CHECKING:
    from stainctl.readout.measure import TileReadout


@dataclass(frozen=True, kw_only=True)
class ClassBins:
    """`--classes low<20<high`: class names between increasing thresholds of a measure (a
    value below the first threshold is the first class, at or above the last the last); or
    just names (`low,high`) when the labels come from a CSV."""

    names: tuple[str, ...]
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) < 2 or len(set(self.names)) < len(self.names):
            raise UsageError(f"--classes needs at least two distinct class names, got "
                             f"{list(self.names)}")
        if self.thresholds and (len(self.thresholds) != len(self.names) - 1
                                or list(self.thresholds) != sorted(set(self.thresholds))):
            raise UsageError("--classes: give the names between increasing thresholds, e.g. "
                             "'low<20<high' or 'neg<1<low<20<high'")

    @classmethod
    def parse(cls, text: str) -> ClassBins:
        if "<" in text:
            parts = [p.strip() for p in text.split("<")]
            names, values = parts[0::2], parts[1::2]
            try:
                thresholds = tuple(float(v) for v in values)
            except ValueError:
                raise UsageError(f"--classes {text!r}: the thresholds between the names must be "
                                 "numbers, e.g. 'low<20<high'") from None
            return cls(names=tuple(names), thresholds=thresholds)
        return cls(names=tuple(p.strip() for p in text.split(",") if p.strip()))

    def bin(self, value: float) -> int:
        return int(np.searchsorted(np.asarray(self.thresholds), value, side="right"))

    def text(self) -> str:
        out = self.names[0]
        for t, n in zip(self.thresholds, self.names[1:], strict=True):
            out += f"<{t:g}<{n}"
        return out if self.thresholds else ",".join(self.names)


def _readout(rgb: np.ndarray, mpp: float, nuclear: bool) -> TileReadout:
    from stainctl.readout.measure import measure_tile

    return measure_tile(rgb, mpp, nuclear=nuclear)


def positive_area_pct(rgb: np.ndarray, mpp: float) -> float:
    """readout's DAB-positive area, % of the tissue (its `dab_positive_area_pct`)."""
    return 100 * _readout(rgb, mpp, False).positive_fraction


def h_score(rgb: np.ndarray, mpp: float) -> float:
    """readout's H-score, 0-300."""
    return _readout(rgb, mpp, False).h_score


def index_pct(rgb: np.ndarray, mpp: float) -> float:
    """readout's nuclear positivity index, % of the nuclei (nan: no nucleus found)."""
    index = _readout(rgb, mpp, True).index
    return math.nan if index is None else 100 * index


def dab_mean(rgb: np.ndarray, mpp: float) -> float:
    """Mean DAB optical density of the tissue pixels: graded where readout's positive area is
    all or nothing (low-resolution images, faint stains)."""
    from stainctl.stain.deconvolution import dab_density
    from stainctl.stain.tissue import TISSUE_BELOW

    tissue = rgb[..., :3].mean(axis=2) < TISSUE_BELOW
    return float(dab_density(rgb)[tissue].mean()) if tissue.any() else 0.0


# --measure: what a tile's IHC readout is binned on, in the units of readout's CSV columns
# (index_pct, dab_positive_area_pct, h_score), so --classes thresholds read like a report's.
MEASURES: dict[str, Callable[[np.ndarray, float], float]] = {
    "index": index_pct, "positive-area": positive_area_pct, "h-score": h_score,
    "dab-mean": dab_mean}


def default_measure(marker: str) -> str:
    """The index for nuclear markers (Ki67, ER, PR, P53), else the DAB-positive area."""
    from stainctl.readout.markers import ALIASES, is_nuclear

    m = marker.strip().lower()
    return "index" if is_nuclear(ALIASES.get(m, m)) else "positive-area"


@dataclass(frozen=True, kw_only=True)
class PairTiles:
    """Corresponding tiles of one registered pair, at the encoder's µm/px."""

    name: str  # the H&E image's name: the slide in labels CSVs and in the card
    mpp: float  # of the tiles
    he_path: Path
    ihc_path: Path
    he: np.ndarray  # (N, T, T, 3) uint8
    ihc: np.ndarray  # (N, T, T, 3) uint8, the registered IHC
    xy0: np.ndarray  # (N, 2) top-left corners in the H&E file's own (level-0) pixels
    extent0: float  # a tile's side in level-0 px
    registration: dict[str, Any] = field(default_factory=dict)


def _registered(he_path: Path, ihc_path: Path, mpp: float, default_mpp: float | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any], float]:
    """H&E at `mpp`, the IHC warped onto it, the mask of H&E pixels the IHC covers, the
    registration's figures, and the H&E's level-0 px per px at `mpp`."""
    import cv2

    from stainctl.engines.fast.data import load_image
    from stainctl.slide.reader import open_slide
    from stainctl.slide.registration import (
        landmarks_beside,
        read_landmarks,
        register_landmarks,
        warp_onto,
    )

    he, ihc = load_image(he_path, mpp, default_mpp), load_image(ihc_path, mpp, default_mpp)

    def width0(path: Path) -> int:
        slide = open_slide(path, default_mpp)
        try:
            return int(slide.dimensions[0])
        finally:
            slide.close()

    scale0 = width0(he_path) / he.shape[1]
    lh, li = landmarks_beside(he_path), landmarks_beside(ihc_path)
    if lh is None or li is None:  # serial sections cut and scanned alike: resized onto it
        warped = cv2.resize(ihc, (he.shape[1], he.shape[0]), interpolation=cv2.INTER_AREA)
        return he, warped, np.ones(he.shape[:2], bool), {"method": "resize"}, scale0

    def scaled(csv_path: Path, image: Path, loaded: np.ndarray) -> dict[str, np.ndarray]:
        factor = loaded.shape[1] / width0(image)  # landmarks are in the file's own pixels
        return {k: v * factor for k, v in read_landmarks(csv_path).items()}

    reg = register_landmarks(scaled(lh, he_path, he), scaled(li, ihc_path, ihc), he.shape[:2])
    warped, inside = warp_onto(ihc, reg.matrix, he.shape[:2])
    figures = {"method": "landmarks", "landmarks": reg.landmarks,
               "error_before_px": round(reg.error_before, 2),
               "error_after_px": round(reg.error_after, 2),
               "relative_error_after": round(reg.error_after / reg.diagonal, 5)}
    return he, warped, inside, figures, scale0


def pair_tiles(he_path: Path, ihc_path: Path, *, mpp: float, tile: int,
               default_mpp: float | None, min_tissue: float = MIN_TISSUE) -> PairTiles:
    """Non-overlapping tiles of the H&E that are tissue, wholly covered by the registered IHC,
    and tissue there too."""
    from stainctl.errors import NO_MPP, SlideError

    try:
        he, ihc, inside, figures, scale0 = _registered(he_path, ihc_path, mpp, default_mpp)
    except SlideError as err:
        if err.code == NO_MPP:  # train-align's option for it is not tile's --mpp
            raise UsageError(f"{err.path}: the image has no pixel size (mpp) in its metadata; "
                             "give it with --default-mpp F (µm/px)") from None
        raise UsageError(f"--pair {he_path},{ihc_path}: {err}") from None
    keep_he, keep_ihc, xy = [], [], []
    for y in range(0, he.shape[0] - tile + 1, tile):
        for x in range(0, he.shape[1] - tile + 1, tile):
            a, b = he[y:y + tile, x:x + tile], ihc[y:y + tile, x:x + tile]
            if (inside[y:y + tile, x:x + tile].all() and is_tissue_crop(a, min_tissue)
                    and is_tissue_crop(b, min_tissue)):
                keep_he.append(a)
                keep_ihc.append(b)
                xy.append((x * scale0, y * scale0))
    name = he_path.name.split(".")[0]
    if not keep_he:
        raise UsageError(f"--pair {he_path},{ihc_path}: no {tile}-px tile is tissue on both "
                         "sections after registration; check the pair (and its landmarks)")
    return PairTiles(name=name, mpp=mpp, he_path=he_path, ihc_path=ihc_path, he=np.stack(keep_he),
                     ihc=np.stack(keep_ihc), xy0=np.round(np.asarray(xy)).astype(np.int64),
                     extent0=tile * scale0, registration=figures)


@dataclass(frozen=True)
class LabelTable:
    """A labels CSV: `slide,class` rows (a slide's label), `slide,x,y,class` rows (the label of
    the tile holding level-0 point x, y of that H&E slide); `slide` is the H&E file's name or
    path."""

    slides: dict[str, str]
    tiles: dict[str, list[tuple[float, float, str]]]

    @classmethod
    def read(cls, path: Path) -> LabelTable:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as err:
            raise UsageError(f"--labels {path}: cannot be read ({err.strerror})") from None
        if not rows or not {"slide", "class"} <= set(rows[0]):
            raise UsageError(f"--labels {path}: needs a header with 'slide' and 'class' "
                             "columns (and 'x', 'y' for tile labels, level-0 px)")
        slides: dict[str, str] = {}
        tiles: dict[str, list[tuple[float, float, str]]] = {}
        for i, r in enumerate(rows, start=2):
            key = Path(r["slide"].strip()).name.split(".")[0]
            label = r["class"].strip()
            x, y = (r.get("x") or "").strip(), (r.get("y") or "").strip()
            if not x and not y:
                slides[key] = label
                continue
            try:
                tiles.setdefault(key, []).append((float(x), float(y), label))
            except ValueError:
                raise UsageError(f"--labels {path}, line {i}: x and y must be numbers") from None
        return cls(slides, tiles)

    def classes(self) -> tuple[str, ...]:
        found = set(self.slides.values()) | {c for v in self.tiles.values() for *_, c in v}
        return tuple(sorted(found))


def tile_labels(pair: PairTiles, bins: ClassBins, measure: str | None,
                table: LabelTable | None) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Per tile: the measure (nan without one) and the class index (-1: unlabelled); the
    slide's class index (-1: none) and where it came from."""
    n = len(pair.he)
    values = np.full(n, math.nan)
    labels = np.full(n, -1, np.int64)
    index = {c: i for i, c in enumerate(bins.names)}

    def code(label: str, where: str) -> int:
        if label not in index:
            raise UsageError(f"{where}: class {label!r} is not one of --classes "
                             f"{', '.join(bins.names)}")
        return index[label]

    if measure is not None:
        fn = MEASURES[measure]
        values = np.array([fn(t, pair.mpp) for t in pair.ihc], np.float64)
        # A tile without a value (no nucleus for an index) stays unlabelled.
        labels = np.array([bins.bin(v) if math.isfinite(v) else -1 for v in values], np.int64)
    slide_label, source = -1, "none"
    if table is not None:
        for x, y, label in table.tiles.get(pair.name, []):
            hit = np.nonzero((pair.xy0[:, 0] <= x) & (x < pair.xy0[:, 0] + pair.extent0)
                             & (pair.xy0[:, 1] <= y) & (y < pair.xy0[:, 1] + pair.extent0))[0]
            labels[hit] = code(label, f"--labels, slide {pair.name}")
        if pair.name in table.slides:
            slide_label, source = code(table.slides[pair.name], "--labels"), "labels CSV"
    if slide_label < 0 and measure is not None and np.isfinite(values).any():
        slide_label, source = bins.bin(float(np.nanmean(values))), f"mean tile {measure}"
    elif slide_label < 0 and (labels >= 0).any():
        slide_label = int(np.bincount(labels[labels >= 0]).argmax())
        source = "majority of tile labels"
    return values, labels, slide_label, source
