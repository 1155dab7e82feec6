"""One streaming pass over an image set: everything the metrics need, per image.

Images are decoded and their CPU statistics (DAB, badness signs, seam steps) computed on reader
threads, ahead of the feature network, which runs on full tiles and on seeded random crops in
batches. Only features and small per-image records are kept, so memory does not grow with the
tiles' size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stainctl.evaluate.badness import TileSigns, tile_signs
from stainctl.evaluate.sources import Item, crop_boxes
from stainctl.evaluate.stain import DabStats, dab_stats


@dataclass(frozen=True)
class MeasureOptions:
    full: bool = True  # Inception features of whole tiles (FID)
    crop_seeds: tuple[int, ...] = ()  # seeds of the crop streams (CropFID, KID)
    crops: int = 4
    crop_size: int = 256
    stain: bool = True
    signs: bool = True
    seams: bool = True
    colour: bool = False  # tissue pixel samples for the colour metrics
    dab_threshold: float = 0.15
    batch_size: int = 16
    readers: int = 2


@dataclass
class SetMeasures:
    keys: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> why it was left out
    full: list[np.ndarray] = field(default_factory=list)
    crops: dict[int, list[np.ndarray]] = field(default_factory=dict)
    encoded: list[np.ndarray] = field(default_factory=list)
    dab: list[DabStats] = field(default_factory=list)
    signs: list[TileSigns] = field(default_factory=list)
    seam: np.ndarray = field(default_factory=lambda: np.zeros(4))  # border sum, n, inside sum, n
    # Per image: a sample of its tissue pixels and one of all its pixels (colour metrics).
    colour: list[np.ndarray] = field(default_factory=list)
    colour_all: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "stats": 0.0,
                                                                 "features": 0.0})

    def features(self, name: str, seed: int | None = None) -> np.ndarray:
        parts = self.crops[seed] if name == "crops" and seed is not None else (
            self.full if name == "full" else self.encoded)
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    @property
    def seam_ratio(self) -> float | None:
        b, bn, i, n = self.seam
        if bn == 0 or n == 0:
            return None
        return float((b / bn) / max(i / n, 1e-9))


@dataclass
class _Loaded:
    index: int
    item: Item
    image: np.ndarray | None
    error: str | None
    dab: DabStats | None
    signs: TileSigns | None
    seam: np.ndarray | None
    decode_s: float
    stats_s: float
    colour: tuple[np.ndarray, np.ndarray] | None = None


def measure_set(items: Sequence[Item], options: MeasureOptions,
                network: Callable[[np.ndarray], np.ndarray] | None,
                encoder: Callable[[np.ndarray], np.ndarray] | None = None,
                progress: Callable[[int], None] | None = None) -> SetMeasures:
    """`network`: uint8 (B, H, W, 3) -> (B, D) features (Inception); `encoder` likewise."""
    out = SetMeasures()
    full_batch: list[np.ndarray] = []
    crop_batches: dict[int, list[np.ndarray]] = {s: [] for s in options.crop_seeds}
    enc_batch: list[np.ndarray] = []
    for seed in options.crop_seeds:
        out.crops[seed] = []

    def flush(force: bool) -> None:
        t0 = time.perf_counter()
        if network is not None:
            _flush(full_batch, network, out.full, options.batch_size, force)
            for seed, batch in crop_batches.items():
                _flush(batch, network, out.crops[seed], options.batch_size * options.crops,
                       force)
        if encoder is not None:
            _flush(enc_batch, encoder, out.encoded, options.batch_size, force)
        out.seconds["features"] += time.perf_counter() - t0

    for loaded in _prefetch(items, options):
        out.seconds["decode"] += loaded.decode_s
        out.seconds["stats"] += loaded.stats_s
        if loaded.image is None:
            out.failed[loaded.item.key] = loaded.error or "unreadable"
            continue
        image = loaded.image
        out.keys.append(loaded.item.key)
        if loaded.dab is not None:
            out.dab.append(loaded.dab)
        if loaded.signs is not None:
            out.signs.append(loaded.signs)
        if loaded.seam is not None:
            out.seam += loaded.seam
        if loaded.colour is not None:
            out.colour.append(loaded.colour[0])
            out.colour_all.append(loaded.colour[1])
        if network is not None and options.full:
            full_batch.append(image)
        for seed in options.crop_seeds:
            for y, x, side in crop_boxes(image.shape[:2], options.crop_size, options.crops,
                                         seed, loaded.index):
                crop_batches[seed].append(image[y:y + side, x:x + side])
        if encoder is not None:
            enc_batch.append(image)
        flush(False)
        if progress is not None:
            progress(1)
    flush(True)
    return out


def _flush(batch: list[np.ndarray], fn: Callable[[np.ndarray], np.ndarray],
           sink: list[np.ndarray], size: int, force: bool) -> None:
    """Run `fn` on batches of up to `size` same-shaped images: once `size` are waiting, or on
    all that wait when `force`."""
    while batch and (force or len(batch) >= size):
        n = 1
        while n < min(size, len(batch)) and batch[n].shape == batch[0].shape:
            n += 1
        sink.append(fn(np.stack(batch[:n])))
        del batch[:n]


def _prefetch(items: Sequence[Item], options: MeasureOptions) -> Iterator[_Loaded]:
    ahead = options.readers * 4

    def work(index: int) -> _Loaded:
        item = items[index]
        t0 = time.perf_counter()
        try:
            image = item.load()
        except Exception as err:  # one bad image must not end the evaluation
            return _Loaded(index, item, None, f"{type(err).__name__}: {err}", None, None, None,
                           time.perf_counter() - t0, 0.0)
        from stainctl.evaluate.colour import colour_pixels

        t1 = time.perf_counter()
        dab = dab_stats(image, options.dab_threshold) if options.stain else None
        signs = tile_signs(image) if options.signs else None
        seam = _seam_sums(image, item.borders) if options.seams and item.borders else None
        colour = colour_pixels(image, index) if options.colour else None
        return _Loaded(index, item, image, None, dab, signs, seam, t1 - t0,
                       time.perf_counter() - t1, colour)

    with ThreadPoolExecutor(max(1, options.readers)) as pool:
        pending: list[Future[_Loaded]] = []
        nxt = 0
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < ahead:
                pending.append(pool.submit(work, nxt))
                nxt += 1
            yield pending.pop(0).result()


def _seam_sums(image: np.ndarray, borders: tuple[Sequence[int], Sequence[int]]) -> np.ndarray:
    from stainctl.evaluate.seams import seam_sums

    return np.asarray(seam_sums(image, *borders), dtype=np.float64)


def network_fn(model: Any, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    from stainctl.evaluate.features import extract

    return lambda images: extract(model, images, device)
