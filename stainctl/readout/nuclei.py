"""Nuclei of a brightfield IHC tile, found in its haematoxylin + DAB optical density.

Every nucleus takes up haematoxylin (blue, negative) or DAB (brown, positive for a nuclear marker)
or both, so the sum of the two densities outlines all nuclei whatever their status. The steps
(scikit-image's watershed; OpenCV for the filters, which give scikit-image's results several times
faster, see each helper):
  1. densities by colour deconvolution (`stainctl.stain.deconvolution`, the project's one set of
     stain vectors), relative to the slide's glass colour, at the tile's resolution;
  2. both densities area-averaged onto the working grid (`NucleiParams.grid_mpp`, 1 µm/px by
     default: a quarter of the pixels of a 0.5 µm/px readout tile); every later step runs there;
  3. Gaussian smoothing (sigma in µm) to merge chromatin texture into one blob per nucleus;
  4. foreground: smoothed density above `foreground_od`;
  5. seeds: local maxima of the distance to the background at least `min_distance_um` apart
     (touching nuclei are two bumps of that distance);
  6. watershed of the inverted density from the seeds, inside the foreground (scikit-image's,
     only where two or more seeds share a piece of foreground, and on a grid of half the
     working grid's pixels each way: see `_watershed`);
  7. size limits in µm² (debris below, unsplit clumps and stroma streaks above).
Every length is in µm and converted with the working grid's µm/px, so a slide scanned at 0.23 or
at 0.35 µm/px gives the same nuclei. A nucleus is positive when its mean DAB density (on the
working grid: the mean of area averages is the nucleus' mean) exceeds `positive_od`.

Why a 1 µm grid: a nucleus is 6-20 µm across, 6-20 pixels there, so the smallest one kept
(20 µm², a small lymphocyte) is still ~20 pixels; detection costs ~3 ms a 576-px readout tile
instead of ~12 ms at 0.5 µm/px, which is what lets `readout` with nuclei run near the speed of
reading its tiles. Against detection at 0.5 µm/px, the OS-2 Ki67 slides find 3-4 % more
nuclei (mostly the seed spacing, 2.5 µm, which is 2 px here) and their indices move by less
than 0.6 points (tests/test_readout.py, bench/RESULTS.md). A tile already coarser than the
grid is detected at its own resolution.

Densities are in the units of `skimage.color.rgb2hed` (natural-log density / ln(1e6), i.e. the
decadic optical density QuPath shows divided by 6).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WHITE = (255, 255, 255)


@dataclass(frozen=True, kw_only=True)
class NucleiParams:
    """How nuclei are found; lengths in µm, areas in µm², densities in rgb2hed units.

    Defaults are set from nuclear size, not fitted to a slide: lymphocyte nuclei are ~6 µm across
    (~28 µm²), tumour nuclei up to ~15-20 µm (~300 µm²). `min_area_um2` drops debris smaller than
    a small lymphocyte nucleus; `max_area_um2` drops what no single nucleus is. Smoothing of 1 µm
    (a sixth of the smallest nucleus) removes chromatin texture without merging neighbours; seeds
    4 µm apart split touching nuclei but not one nucleus into two. `foreground_od` 0.05 (decadic
    0.3) is darker than cytoplasm and stroma counterstained by haematoxylin, lighter than a pale
    negative nucleus; `positive_od` 0.033 (decadic 0.2) is QuPath's default for a DAB-positive
    nucleus (mean nuclear DAB, its positive cell detection). `grid_mpp` is the working grid's
    µm/px (a finer tile is area-averaged onto it; see the module's docstring).
    """

    sigma_um: float = 1.0
    seed_sigma_um: float = 1.5
    background_radius_um: float = 8.0
    min_distance_um: float = 2.5
    min_area_um2: float = 20.0
    max_area_um2: float = 400.0
    foreground_od: float = 0.0167
    positive_od: float = 0.033
    grid_mpp: float = 1.0

    def __post_init__(self) -> None:
        for name in ("sigma_um", "seed_sigma_um", "background_radius_um",
                     "min_distance_um", "min_area_um2", "max_area_um2",
                     "foreground_od", "positive_od", "grid_mpp"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"NucleiParams.{name} must be a positive number, not {value!r}")
        if self.max_area_um2 <= self.min_area_um2:
            raise ValueError("NucleiParams.max_area_um2 must be larger than min_area_um2 "
                             f"({self.max_area_um2} <= {self.min_area_um2})")


@dataclass(frozen=True, kw_only=True)
class Nuclei:
    """Nuclei of one tile, found on a working grid of `grid_mpp` µm/px: `grid_labels` (h, w)
    int32 on that grid, 0 = not a nucleus, i = nucleus i (1-based, row i-1 of the per-nucleus
    arrays); per nucleus its area in µm², mean DAB density, centroid (x, y) in tile pixels, and
    whether it is positive. `shape` is the tile's (H, W); `labels` are the labels at it.

    The labels are kept as found (`found_labels`, one per seed) with `renumber` (found label ->
    nucleus, 0 for one outside the size limits), and `grid_labels` made from them when asked:
    the readout needs only the counts, and relabelling every tile cost ~0.1 ms of ~4."""

    found_labels: np.ndarray = field(repr=False)
    renumber: np.ndarray = field(repr=False)
    grid_mpp: float
    shape: tuple[int, int]
    area_um2: np.ndarray = field(repr=False)
    mean_dab: np.ndarray = field(repr=False)
    centroid_xy: np.ndarray = field(repr=False)
    positive: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        n = len(self.area_um2)
        if self.found_labels.ndim != 2 or len(self.shape) != 2:
            raise ValueError(f"Nuclei.found_labels must be 2-D, not {self.found_labels.shape}")
        if not (math.isfinite(self.grid_mpp) and self.grid_mpp > 0):
            raise ValueError(f"Nuclei.grid_mpp must be a positive µm/px, not {self.grid_mpp!r}")
        if not (len(self.mean_dab) == len(self.positive) == len(self.centroid_xy) == n):
            raise ValueError("Nuclei: per-nucleus arrays differ in length")

    @functools.cached_property
    def grid_labels(self) -> np.ndarray:
        """(h, w) int32 nucleus labels on the working grid (0: none)."""
        found = self.found_labels
        out = np.zeros(found.shape, dtype=np.int32)
        where = np.flatnonzero(found > 0)
        out.ravel()[where] = self.renumber.take(found.ravel().take(where))  # labelled only
        return out

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32 labels at the tile's pixels: each working-grid pixel's label on the
        tile pixels it covers. Made on demand: the readout itself needs only the counts."""
        import cv2

        h, w = self.shape
        if self.grid_labels.shape == (h, w):
            return self.grid_labels
        return cv2.resize(self.grid_labels, (w, h), interpolation=cv2.INTER_NEAREST)

    @property
    def count(self) -> int:
        return len(self.area_um2)

    @property
    def positive_count(self) -> int:
        return int(np.count_nonzero(self.positive))


def _check_input(rgb: np.ndarray, mpp: float) -> None:
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), not {rgb.dtype} {rgb.shape}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, not {mpp!r}")


def densities(rgb: np.ndarray, white: tuple[int, int, int] = WHITE) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """(haematoxylin, DAB) float32 densities of a uint8 RGB(A) tile relative to `white`: the
    formula of `stainctl.stain.deconvolution.stain_density` (the project's one set of stain
    vectors), computed as one per-channel -log lookup (`cv2.LUT`) and one 3 -> 2 matrix product
    (`cv2.transform`), in float32 and outside the GIL: ~4x faster than a numpy lookup per stain
    and channel, which matters when it runs on every tile of a slide."""
    import cv2

    rgb = np.ascontiguousarray(rgb[..., :3])
    lut, matrix = _od_tables((int(white[0]), int(white[1]), int(white[2])))
    od = cv2.LUT(rgb, lut)
    # One (1, 3) transform per stain: OpenCV's (2, 3) transform is ~10x slower than two of them.
    h = cv2.transform(od, matrix[:1])
    d = cv2.transform(od, matrix[1:])
    return cv2.max(h, 0.0, dst=h), cv2.max(d, 0.0, dst=d)


@functools.cache
def _od_tables(white: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(1, 256, 3) float32 per-channel optical density of each intensity relative to `white`
    (clipped at the glass, as `stain_density`), and the (2, 3) float32 rows of the H-E-DAB
    matrix giving haematoxylin and DAB from it."""
    from stainctl.stain.deconvolution import DAB, HAEMATOXYLIN, hed_from_rgb, od_table

    od = od_table(white)
    matrix = hed_from_rgb()[:, [HAEMATOXYLIN, DAB]].T
    return (np.ascontiguousarray(od[None].astype(np.float32)),
            np.ascontiguousarray(matrix.astype(np.float32)))


def detect_nuclei(rgb: np.ndarray, mpp: float, params: NucleiParams | None = None, *,
                  white: tuple[int, int, int] = WHITE,
                  dab: np.ndarray | None = None,
                  haematoxylin: np.ndarray | None = None) -> Nuclei:
    """Nuclei of a uint8 RGB tile at `mpp` µm/px, found on the working grid of
    `params.grid_mpp` (or the tile's own, when coarser). `white` is the slide's glass colour
    (255s for an image whose glass is white); `dab`/`haematoxylin` are its densities when the
    caller has them already (measure_tile), so they are not computed twice."""
    import cv2

    params = params or NucleiParams()
    _check_input(rgb, mpp)
    if dab is None or haematoxylin is None:
        haematoxylin, dab = densities(rgb, white)
    shape = (int(rgb.shape[0]), int(rgb.shape[1]))
    density = np.add(haematoxylin, dab, dtype=np.float32)
    density, dab, grid_mpp = working_grid(density, dab, mpp, params.grid_mpp)
    # The smoothed, background-subtracted density never exceeds the density itself (densities
    # are >= 0, so is their opening): a tile with nothing that dark (glass) has no nuclei.
    if not density.size or float(density.max()) <= params.foreground_od:
        return _empty(density.shape, grid_mpp, shape)
    nuclear = _gaussian(density, params.sigma_um / grid_mpp)
    # Background subtraction (QuPath's "background radius"): an opening wider than any nucleus
    # is the local level of cytoplasm and stroma, which differs between scanners and stains.
    size = 2 * max(1, round(params.background_radius_um / grid_mpp)) + 1
    nuclear -= cv2.morphologyEx(nuclear, cv2.MORPH_OPEN, np.ones((size, size), np.uint8))
    foreground = nuclear > params.foreground_od
    if not foreground.any():
        return _empty(density.shape, grid_mpp, shape)
    # Seeds: tops of the density blurred at the scale of a nucleus (a blob filter), so one
    # nucleus is one top and touching nuclei are two, whatever the fine texture.
    blob = _gaussian(density, params.seed_sigma_um / grid_mpp)
    min_px = max(1, round(params.min_distance_um / grid_mpp))
    seeds_rc = _peaks(blob, foreground, min_px)
    labels = _watershed(-nuclear, foreground, seeds_rc, min_px)
    return _measure(labels, dab, grid_mpp, params, len(seeds_rc), shape)


def working_grid(density: np.ndarray, dab: np.ndarray, mpp: float, grid_mpp: float
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """`density` and `dab` (H, W) at `mpp` area-averaged onto a grid of about `grid_mpp` µm/px
    (whole pixels: the grid's exact µm/px is returned with them); unchanged when `mpp` is
    already that coarse."""
    import cv2

    h, w = density.shape
    if mpp >= grid_mpp or not density.size:
        return density, dab, mpp
    size = (max(1, round(w * mpp / grid_mpp)), max(1, round(h * mpp / grid_mpp)))
    if size == (w, h):
        return density, dab, mpp
    # A pixel of the grid covers (w / gw) x (h / gh) tile pixels; both ratios are within
    # rounding of grid_mpp / mpp, and their geometric mean is the grid's length per pixel.
    out_mpp = mpp * math.sqrt((w / size[0]) * (h / size[1]))
    return (cv2.resize(density, size, interpolation=cv2.INTER_AREA),
            cv2.resize(dab, size, interpolation=cv2.INTER_AREA), out_mpp)


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """float32 Gaussian smoothing, as `skimage.filters.gaussian` (truncated at 4 sigma, edges
    repeated) but with OpenCV's separable filter, several times faster."""
    import cv2

    radius = int(4.0 * sigma + 0.5)
    k = 2 * radius + 1
    return cv2.GaussianBlur(image.astype(np.float32, copy=False), (k, k), sigmaX=sigma,
                            sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _peaks(blob: np.ndarray, foreground: np.ndarray, min_px: int) -> np.ndarray:
    """(n, 2) rows/cols of the local maxima of `blob` in `foreground`, highest first, at least
    `min_px` apart: `skimage.feature.peak_local_max(blob, min_distance=min_px,
    labels=foreground, exclude_border=False)`, with a cv2 max filter and no KD-tree.

    Two maxima closer than `min_px` (Chebyshev) lie in each other's max-filter window, so they
    have the same value: only ties can need peak_local_max's spacing rule, and only they go
    through it."""
    import cv2

    masked = np.full(blob.shape, np.finfo(np.float32).min, np.float32)
    cv2.copyTo(blob.astype(np.float32, copy=False), foreground.view(np.uint8), masked)
    size = 2 * min_px + 1
    # cv2's default border for dilation is "ignore", the same maximum as scipy's 'nearest'.
    top = masked == cv2.dilate(masked, np.ones((size, size), np.uint8))
    top &= foreground
    # Every foreground pixel a maximum (top is within the foreground: equal counts): a flat
    # image, whose special case is left to scikit-image.
    if np.count_nonzero(top) == np.count_nonzero(foreground):
        from skimage.feature import peak_local_max

        return np.asarray(peak_local_max(blob, min_distance=min_px,
                                         labels=foreground.astype(np.int32),
                                         exclude_border=False))
    top &= blob > blob.min()
    # Flat indices, then rows and columns: ~5x faster than a 2-D np.nonzero.
    flat = np.flatnonzero(top)
    rr, cc = np.divmod(flat, top.shape[1])
    values = np.ascontiguousarray(blob).ravel().take(flat)
    order = np.argsort(-values, kind="stable")
    rr, cc, values = rr[order], cc[order], values[order]
    if min_px > 1 and len(values) > 1:
        keep = _spaced_ties(rr, cc, values, min_px)
        rr, cc = rr[keep], cc[keep]
    return np.stack([rr, cc], axis=1)


def _spaced_ties(rr: np.ndarray, cc: np.ndarray, values: np.ndarray, min_px: int) -> np.ndarray:
    """Which of the (sorted) maxima peak_local_max keeps: greedily, highest first, each drops
    the later ones of its value closer than `min_px` (Chebyshev)."""
    keep = np.ones(len(values), dtype=bool)
    tied = np.flatnonzero(values[1:] == values[:-1])
    if not tied.size:
        return keep
    starts = np.unique(np.concatenate([tied, tied + 1]))
    breaks = (np.diff(starts) > 1) | (values[starts[1:]] != values[starts[:-1]])
    for group in np.split(starts, np.flatnonzero(breaks) + 1):
        # a run of equal values, in peak_local_max's order (row-major within a value)
        for a, i in enumerate(group):
            if not keep[i]:
                continue
            rest = group[a + 1:]
            near = (np.abs(rr[rest] - rr[i]) < min_px) & (np.abs(cc[rest] - cc[i]) < min_px)
            keep[rest[near]] = False
    return keep


def _watershed(surface: np.ndarray, foreground: np.ndarray, seeds_rc: np.ndarray,
               min_px: int = 1) -> np.ndarray:
    """(H, W) int32 labels: `skimage.segmentation.watershed(surface, markers, mask=foreground)`
    with seed i (1-based) as marker i, computed only where it decides anything.

    The flood stays inside the 4-connected piece of the mask holding its seed: a piece without
    a seed stays 0, a piece with one seed is that seed's nucleus whole, and only pieces with
    two or more (touching nuclei) are flooded. When seeds are at least 2 px apart (`min_px`:
    each lands in its own 2x2 block) that flood runs on a grid of half the pixels in each
    direction and its labels are taken back to the full grid: the seeds are the same, the line
    between two touching nuclei moves by about a pixel of this grid (so a nucleus near a size
    limit can cross it: on the 8 OS-2 Ki67 readout tiles at 1 µm/px, 2,014 nuclei -> 2,007), and
    scikit-image's flood (~150 ns a pixel, the largest cost of detection) costs a quarter."""
    import cv2

    n, pieces = cv2.connectedComponents(foreground.view(np.uint8), connectivity=4,
                                        ltype=cv2.CV_32S)
    ids = np.arange(1, len(seeds_rc) + 1, dtype=np.int32)
    piece_of = pieces[seeds_rc[:, 0], seeds_rc[:, 1]]
    per_piece = np.bincount(piece_of, minlength=n)
    single = per_piece[piece_of] == 1
    # One look-up gives both: a single seed's piece its id, a shared piece -1 (to flood).
    # (Seeds lie in the foreground, so the background, piece 0, keeps 0.)
    lut = np.where(per_piece > 1, np.int32(-1), np.int32(0))
    lut[piece_of[single]] = ids[single]
    labels = lut.take(pieces)  # (take: ~2x faster than indexing, for every gather here)
    if not single.all():
        # One flood over all those pieces at once (they cannot meet inside the mask): one
        # call's overhead instead of one per piece.
        mask = labels < 0
        flooded = _flood(surface, mask, seeds_rc[~single], ids[~single], 2 if min_px >= 2 else 1)
        np.copyto(labels, flooded, where=mask)
    return labels


def _flood(surface: np.ndarray, mask: np.ndarray, seeds_rc: np.ndarray, ids: np.ndarray,
           step: int) -> np.ndarray:
    """scikit-image's watershed of `surface` from seeds `ids` inside `mask`, on a grid `step`
    times coarser (1: the full grid); labels at full size, meaningful inside `mask`."""
    import cv2

    h, w = mask.shape
    if step == 1:
        markers = np.zeros((h, w), dtype=np.int32)
        markers[seeds_rc[:, 0], seeds_rc[:, 1]] = ids
        return skimage_watershed(surface, markers, mask)
    # Even sides, so each coarse pixel is exactly a 2x2 block (the pad is outside the mask).
    ph, pw = -h % 2, -w % 2
    mask8 = cv2.compare(mask.view(np.uint8), 0, cv2.CMP_GT)  # 0/255: a 2x2 mean of one is > 0
    if ph or pw:
        surface = cv2.copyMakeBorder(surface, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
        mask8 = cv2.copyMakeBorder(mask8, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
    size = ((w + pw) // 2, (h + ph) // 2)
    # A coarse pixel is in the mask when any of its four is: every full pixel has its coarse
    # pixel flooded, and a 4-connected piece stays 4-connected.
    coarse_mask = cv2.resize(mask8, size, interpolation=cv2.INTER_AREA) > 0
    coarse = cv2.resize(surface, size, interpolation=cv2.INTER_AREA)
    markers = np.zeros(coarse_mask.shape, dtype=np.int32)
    markers[seeds_rc[:, 0] // 2, seeds_rc[:, 1] // 2] = ids  # >= 2 px apart: one per pixel
    flooded = skimage_watershed(coarse, markers, coarse_mask)
    full = cv2.resize(flooded, (w + pw, h + ph), interpolation=cv2.INTER_NEAREST)
    return full[:h, :w]


def skimage_watershed(surface: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) int32: `skimage.segmentation.watershed(surface, markers, mask=mask)` for 2-D
    int32 `markers` and a bool `mask` (4-connected, no compactness, no lines), by
    scikit-image's own flood (`_watershed_cy.watershed_raveled`) with the arrays its wrapper
    would make. The wrapper costs ~0.25 ms a readout tile, and its import (scipy.ndimage,
    skimage.morphology) ~0.25 s at the first tile of every readout, while the flood's own
    module imports in ~2 ms. Where that private function is missing or changed, the public
    one; tests/test_readout.py checks the two agree on real tiles."""
    flood = _raveled_flood()
    if flood is not None:
        h, w = surface.shape
        wide = w + 2  # a 1-pixel frame outside the mask, as the wrapper pads, keeps the
        # flood inside the array
        image = np.zeros((h + 2, wide), np.float64)
        image[1:-1, 1:-1] = surface
        inside = np.zeros((h + 2, wide), np.int8)
        inside[1:-1, 1:-1] = mask
        out = np.zeros((h + 2, wide), np.int32)
        np.multiply(markers, mask, out=out[1:-1, 1:-1])  # markers outside the mask: 0
        try:
            # 4-neighbours in the wrapper's order (nearest first, then raveled order)
            flood(image.ravel(), np.flatnonzero(out), np.array([-wide, -1, 1, wide], np.intp),
                  inside.ravel(), np.array([wide, 1], np.intp), 0.0, out.ravel(), False)
            return out[1:-1, 1:-1]
        except (TypeError, ValueError):  # another signature: the public function
            pass
    from skimage.segmentation import watershed as public

    return np.asarray(public(surface, markers, mask=mask), dtype=np.int32)


@functools.cache
def _raveled_flood() -> Any:
    try:
        from skimage.segmentation._watershed_cy import watershed_raveled
    except ImportError:
        return None
    return watershed_raveled


def _empty(grid_shape: tuple[int, ...], grid_mpp: float, shape: tuple[int, int]) -> Nuclei:
    return Nuclei(found_labels=np.zeros(grid_shape[:2], dtype=np.int32),
                  renumber=np.zeros(1, dtype=np.int32), grid_mpp=grid_mpp, shape=shape,
                  area_um2=np.zeros(0), mean_dab=np.zeros(0),
                  centroid_xy=np.zeros((0, 2)), positive=np.zeros(0, dtype=bool))


def _measure(labels: np.ndarray, dab: np.ndarray, mpp: float, params: NucleiParams,
             n: int, shape: tuple[int, int]) -> Nuclei:
    """Per-nucleus measurements of labels 1..n on a grid of `mpp` µm/px, keeping nuclei within
    the size limits (relabelled 1..m); centroids in the pixels of a tile of `shape`. Sums over
    the labelled pixels only (a minority of the tile), by flat index, each once; the size
    filter selects from them."""
    if n == 0:
        return _empty(labels.shape, mpp, shape)
    where = np.flatnonzero(labels > 0)  # ~4x faster than on the int32 labels themselves
    lab = labels.ravel().take(where)
    counts = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    area = counts * (mpp * mpp)
    keep = (area >= params.min_area_um2) & (area <= params.max_area_um2)
    m = int(np.count_nonzero(keep))
    if m == 0:
        return _empty(labels.shape, mpp, shape)
    counts = counts[keep]
    dab_px = np.ascontiguousarray(dab).ravel().take(where)
    dab_sum = np.bincount(lab, weights=dab_px, minlength=n + 1)[1:][keep]
    # Centroids from sums of flat indices and of columns: whole numbers, exact in float64, so
    # the same as sums of rows and columns, without gathering either.
    width = labels.shape[1]
    flat_sum = np.bincount(lab, weights=where, minlength=n + 1)[1:][keep]
    col_sum = np.bincount(lab, weights=where % width, minlength=n + 1)[1:][keep]
    cy = (flat_sum - col_sum) / width / counts
    cx = col_sum / counts
    # Grid pixel centres to tile pixel centres: grid pixel j covers tile pixels [j s, (j+1) s).
    sy, sx = shape[0] / labels.shape[0], shape[1] / labels.shape[1]
    cy, cx = (cy + 0.5) * sy - 0.5, (cx + 0.5) * sx - 0.5
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[1:][keep] = np.arange(1, m + 1, dtype=np.int32)
    mean_dab = dab_sum / counts
    return Nuclei(found_labels=labels, renumber=remap, grid_mpp=mpp, shape=shape,
                  area_um2=area[keep],
                  mean_dab=mean_dab, centroid_xy=np.stack([cx, cy], axis=1),
                  positive=mean_dab > params.positive_od)
