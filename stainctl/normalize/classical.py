"""Macenko and Reinhard stain normalisation (torchstain), fitted once per slide.

torchstain fits the parameters: the target's from the reference, the source's from a sample of
the slide's tissue tiles (`sample.py`). Every tile of the slide is then mapped with those same
parameters, so neighbouring tiles agree and the stitched slide shows no seam (fitting per tile
makes each tile's colours depend on its own content). Both methods are a function of the pixel's
colour alone once fitted, so the mapping is computed once per slide for all 2^24 colours (a
48 MB table, about a second) and a tile costs one table look-up.

Glass stays glass: for both methods, pixels fade from the normalised colour back to their own as
their optical density (against the slide's own glass colour) falls to that of glass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import UsageError
from stainctl.normalize import CLASSICAL
from stainctl.normalize.sample import StainSample

if TYPE_CHECKING:
    import torch

    from stainctl.models.card import ModelCard

# Optical density (against the glass) below which a pixel is glass and keeps its colour, and the
# band over which it fades to the normalised colour.
GLASS_OD = 0.02
FADE_OD = 0.08
_CHUNK = 1 << 20  # colours per block while the table is built
# Macenko's transmitted light, torchstain's default, for the slide and the reference alike (each
# one's own glass as the light gave a larger colour distance to the target on the real slides:
# a bright glass lends every pixel extra optical density). Glass is kept by the fade instead.
IO = 240.0


def _macenko(sample: StainSample) -> dict[str, Any]:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    norm = NumpyMacenkoNormalizer()
    try:
        norm.fit(sample.pixels.reshape(-1, 1, 3), Io=IO)
    except (ValueError, np.linalg.LinAlgError, IndexError) as err:
        raise UsageError(f"{sample.name}: its stains could not be estimated (too pale or too "
                         f"few stained pixels: {err})") from None
    return {"stain_matrix": np.round(norm.HERef, 6).tolist(),
            "max_concentration": np.round(norm.maxCRef, 6).tolist(),
            "glass": list(sample.glass)}


def _reinhard(sample: StainSample) -> dict[str, Any]:
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    norm = NumpyReinhardNormalizer()
    norm.fit(sample.pixels.reshape(-1, 1, 3))
    return {"lab_mean": np.round(norm.target_means, 6).tolist(),
            "lab_std": np.round(norm.target_stds, 6).tolist(),
            "glass": list(sample.glass)}


def fit_stains(method: str, sample: StainSample) -> dict[str, Any]:
    """The parameters `method` takes from one image or slide (JSON-ready numbers)."""
    if method not in CLASSICAL:
        raise UsageError(f"--method must be one of {', '.join(CLASSICAL)} here, got {method}")
    return _macenko(sample) if method == "macenko" else _reinhard(sample)


@dataclass(frozen=True, kw_only=True)
class StainFit:
    """One slide's fitted normalisation: its own parameters and the target's."""

    method: str
    source: Mapping[str, Any]
    target: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.method not in CLASSICAL:
            raise ValueError(f"unknown method {self.method}")

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "source": dict(self.source), "target": dict(self.target)}

    def table(self) -> NDArray[np.uint8]:
        """(2^24, 3) uint8: the normalised colour of every RGB colour, indexed r<<16|g<<8|b."""
        lut = np.empty((1 << 24, 3), np.uint8)
        for start in range(0, 1 << 24, _CHUNK):
            idx = np.arange(start, start + _CHUNK, dtype=np.uint32)
            rgb = np.stack([(idx >> 16) & 255, (idx >> 8) & 255, idx & 255], axis=1)
            lut[start:start + _CHUNK] = self.apply_colours(rgb.astype(np.float32))
        return lut

    def apply_colours(self, rgb: NDArray[np.float32]) -> NDArray[np.uint8]:
        """(N, 3) colours in 0-255 -> their normalised uint8 colours."""
        glass = np.asarray(self.source["glass"], np.float32)
        out = self._macenko(rgb) if self.method == "macenko" else self._reinhard(rgb)
        od = -np.log((rgb + 1) / (glass + 1)).max(axis=1, keepdims=True)
        w = np.clip((od - GLASS_OD) / FADE_OD, 0, 1)
        return np.clip(np.rint(w * out + (1 - w) * rgb), 0, 255).astype(np.uint8)

    def _macenko(self, rgb: NDArray[np.float32]) -> NDArray[np.float32]:
        he_src = np.asarray(self.source["stain_matrix"], np.float32)
        he_ref = np.asarray(self.target["stain_matrix"], np.float32)
        scale = (np.asarray(self.target["max_concentration"], np.float32)
                 / np.maximum(np.asarray(self.source["max_concentration"], np.float32), 1e-6))
        od = -np.log((rgb + 1) / IO)
        conc = od @ np.linalg.pinv(he_src).T * scale  # least squares, as torchstain's lstsq
        return np.minimum(IO * np.exp(-conc @ he_ref.T), 255)

    def _reinhard(self, rgb: NDArray[np.float32]) -> NDArray[np.float32]:
        import cv2

        # torchstain's statistics are in CIE Lab (L 0-100), as OpenCV's float Lab.
        lab = cv2.cvtColor((rgb / 255)[None], cv2.COLOR_RGB2Lab)[0]
        mu_s = np.asarray(self.source["lab_mean"], np.float32)
        sd_s = np.maximum(np.asarray(self.source["lab_std"], np.float32), 1e-6)
        mu_t = np.asarray(self.target["lab_mean"], np.float32)
        sd_t = np.asarray(self.target["lab_std"], np.float32)
        lab = (lab - mu_s) / sd_s * sd_t + mu_t
        lab[:, 0] = np.clip(lab[:, 0], 0, 100)
        out = cv2.cvtColor(lab[None].astype(np.float32), cv2.COLOR_Lab2RGB)[0]
        return np.clip(out * 255, 0, 255)


class StainTransform:
    """A fitted normalisation applied to uint8 tiles through its colour table."""

    def __init__(self, fit: StainFit) -> None:
        self.fit = fit
        self.lut = fit.table()

    def apply(self, tiles: NDArray[np.uint8]) -> NDArray[np.uint8]:
        t = tiles[..., :3]
        idx = ((t[..., 0].astype(np.uint32) << 16) | (t[..., 1].astype(np.uint32) << 8)
               | t[..., 2])
        return self.lut[idx]


@dataclass(frozen=True, kw_only=True)
class Normaliser:
    """A classical method and the target it normalises to, fitted on the reference once."""

    method: str
    target: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""  # the reference's path, for messages

    @classmethod
    def to_reference(cls, method: str, reference: StainSample) -> Normaliser:
        return cls(method=method, target=fit_stains(method, reference), reference=reference.name)

    def settings(self) -> dict[str, object]:
        """What changes the pixels: the method and the target's fitted parameters (the same
        reference file re-fitted gives the same numbers, a new one other numbers)."""
        return {"method": self.method, "target": dict(self.target)}

    def for_slide(self, sample: StainSample) -> StainTransform:
        return StainTransform(StainFit(method=self.method, source=fit_stains(self.method, sample),
                                       target=self.target))


class IdentityEngine:
    """An engine that gives its tiles back (`engines.base.Engine`): the normalize step's base,
    and the floor the benchmark compares normalisation with."""

    multiple = 1
    input_side: int | None = None
    deterministic = True

    def __init__(self, card: ModelCard, margin: int = 0) -> None:
        import torch

        self.card, self.margin = card, margin
        self.device = torch.device("cpu")
        self.dtype: torch.dtype = torch.float32

    def settings(self) -> Mapping[str, object]:
        return {}

    def translate(self, tiles: NDArray[np.uint8], seeds: Sequence[int]) -> NDArray[np.uint8]:
        return tiles

    def close(self) -> None:
        pass


class NormalisedInput:
    """An engine whose tiles are normalised first (`translate --normalize-to`, and `normalize`
    on the identity engine); everything else is the wrapped engine's."""

    def __init__(self, inner: Any, transform: StainTransform) -> None:
        self.inner, self.transform = inner, transform
        self.card, self.margin, self.multiple = inner.card, inner.margin, inner.multiple
        self.input_side, self.deterministic = inner.input_side, inner.deterministic
        self.device: torch.device = inner.device
        self.dtype: torch.dtype = inner.dtype

    def settings(self) -> Mapping[str, object]:
        return self.inner.settings()

    def translate(self, tiles: NDArray[np.uint8], seeds: Sequence[int]) -> NDArray[np.uint8]:
        return self.inner.translate(self.transform.apply(tiles), seeds)

    def close(self) -> None:
        pass  # the wrapped engine is closed by whoever loaded it
