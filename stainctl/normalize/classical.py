"""Macenko and Reinhard stain normalisation (torchstain), fitted once per slide.

torchstain fits the parameters: the target's from the reference, the source's from a sample of
the slide's tissue tiles (`sample.py`); for Macenko with the stain plane through zero density as
the paper has it (`macenko.py`: torchstain's steps, its centred plane corrected). Every tile
of the slide is then mapped with those same parameters, so neighbouring tiles agree and the
stitched slide shows no seam (fitting per tile makes each tile's colours depend on its own
content). Both methods are a function of the pixel's
colour alone once fitted, so the mapping is computed once per slide for all 2^24 colours (a
64 MB table, about a second) and a tile costs one table look-up.

Glass stays glass: for both methods, pixels fade from the normalised colour back to their own as
their optical density (against the slide's own glass colour) falls to that of glass.

Macenko rebuilds a pixel from its two stain amounts only, so what its density holds off the
stain plane is dropped: a slide normalised to itself changes by that (3.9 grey levels on the
CMU-1 sample's tissue), and the method matches each stain's vector and 99th-percentile amount,
not the Lab statistics (bench/RESULTS.md, normalize, 2026-11-30 norm4).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import UsageError
from stainctl.normalize import CLASSICAL, macenko
from stainctl.normalize.sample import StainSample

if TYPE_CHECKING:
    import torch

    from stainctl.models.card import ModelCard

# Optical density (against the glass) below which a pixel is glass and keeps its colour, and the
# band over which it fades to the normalised colour.
GLASS_OD = 0.02
FADE_OD = 0.08
_CHUNK = 1 << 20  # colours per block while the table is built
# Macenko's transmitted light: torchstain's 240 for the slide and the reference alike. Each
# one's measured glass would be Beer-Lambert's light, but it cannot be had for both: the OS-1
# crop is tissue edge to edge (0.015 % glass, clipped at 255 in red and blue), so one light would
# be measured and the other assumed. Glass is kept by the fade instead.
IO = macenko.IO


def _macenko(sample: StainSample) -> dict[str, Any]:
    try:
        stains, max_conc = macenko.fit_macenko(sample.pixels, IO)
    except (ValueError, np.linalg.LinAlgError, IndexError) as err:
        raise UsageError(f"{sample.name}: its stains could not be estimated (too pale or too "
                         f"few stained pixels: {err})") from None
    return {"stain_matrix": np.round(stains, 6).tolist(),
            "max_concentration": np.round(max_conc, 6).tolist(),
            "glass": list(sample.glass), "plane": macenko.PLANE}


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
        """(2^24, 4) uint8: the normalised RGB (and a zero pad byte) of every colour, indexed
        b<<16|g<<8|r, the 32-bit word of an RGBA pixel in memory (little-endian) with its alpha
        masked off (`StainTransform.apply`)."""
        if self.method == "macenko":
            return self._macenko_table()
        lut = np.zeros((1 << 24, 4), np.uint8)
        for start in range(0, 1 << 24, _CHUNK):
            idx = np.arange(start, start + _CHUNK, dtype=np.uint32)
            rgb = np.stack([idx & 255, (idx >> 8) & 255, idx >> 16], axis=1)
            lut[start:start + _CHUNK, :3] = self.apply_colours(rgb.astype(np.float32))
        return lut

    def apply_colours(self, rgb: NDArray[np.float32]) -> NDArray[np.uint8]:
        """(N, 3) colours in 0-255 -> their normalised uint8 colours."""
        glass = np.asarray(self.source["glass"], np.float32)
        out = self._macenko(rgb) if self.method == "macenko" else self._reinhard(rgb)
        od = -np.log((rgb + 1) / (glass + 1)).max(axis=1, keepdims=True)
        w = np.clip((od - GLASS_OD) / FADE_OD, 0, 1)
        return np.clip(np.rint(w * out + (1 - w) * rgb), 0, 255).astype(np.uint8)

    def _macenko_table(self) -> NDArray[np.uint8]:
        """`table()` for Macenko by separability, about 4x faster than colour by colour: the
        optical density is per channel, and the map from a pixel's density to its normalised
        density is one 3 x 3 matrix, so each output channel's log-intensity is a sum of three
        256-entry tables broadcast over the colour cube (the glass fade's density, a min of
        three)."""
        v = np.arange(256, dtype=np.float32)
        od = -np.log((v + 1) / IO)  # (256,), each channel's density
        glass = np.asarray(self.source["glass"], np.float32)
        od_glass = -np.log((v[None] + 1) / (glass[:, None] + 1))  # (3, 256)
        # The cube's axes are blue, green, red (the table's index b<<16|g<<8|r).
        cube = (None, None, slice(None)), (None, slice(None), None), (slice(None), None, None)
        # As apply_colours: the density of the palest channel (-log(x).max() is that minimum).
        fade = od_glass[0][cube[0]]
        fade = np.minimum(np.minimum(fade, od_glass[1][cube[1]]), od_glass[2][cube[2]])
        w = np.clip((fade - GLASS_OD) / FADE_OD, 0, 1, out=fade)
        m = self._density_map()  # normalised density = m @ density
        lut = np.zeros((256, 256, 256, 4), np.uint8)
        for j in range(3):
            # exp of a sum as a product of three exp tables (no exp over the cube); clipped so
            # a factor never under- or overflows alone (the product's overflow is capped at 255).
            f = [np.exp(np.clip(-m[j, c] * od, -80, 80)).astype(np.float32)[cube[c]]
                 for c in range(3)]
            with np.errstate(over="ignore", under="ignore"):
                out = np.minimum(IO * f[0] * f[1] * f[2] - 1, 255)
            out = w * out + (1 - w) * v[cube[j]]
            lut[..., j] = np.clip(np.rint(out), 0, 255)
        return lut.reshape(-1, 4)

    def _density_map(self) -> NDArray[np.float32]:
        """3 x 3: the slide's optical density -> the normalised one (unmix with the slide's
        stains, scale each stain's amount, remix with the target's)."""
        he_src = np.asarray(self.source["stain_matrix"], np.float32)
        he_ref = np.asarray(self.target["stain_matrix"], np.float32)
        scale = (np.asarray(self.target["max_concentration"], np.float32)
                 / np.maximum(np.asarray(self.source["max_concentration"], np.float32), 1e-6))
        return (he_ref * scale) @ np.linalg.pinv(he_src)

    def _macenko(self, rgb: NDArray[np.float32]) -> NDArray[np.float32]:
        he_src = np.asarray(self.source["stain_matrix"], np.float32)
        he_ref = np.asarray(self.target["stain_matrix"], np.float32)
        scale = (np.asarray(self.target["max_concentration"], np.float32)
                 / np.maximum(np.asarray(self.source["max_concentration"], np.float32), 1e-6))
        od = -np.log((rgb + 1) / IO)
        conc = od @ np.linalg.pinv(he_src).T * scale  # least squares, as torchstain's lstsq
        # The inverse of the density -log((I + 1) / IO), so a pixel on the stain plane mapped
        # by a slide's own fit keeps its colour (torchstain's IO * exp(-OD) leaves every pixel
        # one grey level brighter).
        return np.minimum(IO * np.exp(-conc @ he_ref.T) - 1, 255)

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
        # One uint32 word per colour (RGB and a pad byte), indexed by a pixel's own RGBA word:
        # a tile costs a channel pad, a mask, a 1-D take of words and a channel drop (1.5x
        # faster than building r<<16|g<<8|b from the channels with numpy: 22 against 33 ms per
        # eight 512-px tiles of random colours, norm4).
        self._packed = fit.table().view(np.uint32).ravel()

    def apply(self, tiles: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """(..., W, 3 or 4) uint8 -> (..., W, 3) normalised."""
        import cv2

        t = np.ascontiguousarray(tiles)
        flat = t.reshape(-1, t.shape[-2], t.shape[-1])
        rgba = flat.copy() if t.shape[-1] == 4 else cv2.cvtColor(
            np.ascontiguousarray(flat[..., :3]), cv2.COLOR_RGB2RGBA)
        words = rgba.view(np.uint32)[..., 0]
        if sys.byteorder == "big":
            words.byteswap(inplace=True)  # a<<24|b<<16|g<<8|r, as on little-endian
        np.bitwise_and(words, np.uint32(0xFFFFFF), out=words)
        out = np.take(self._packed, words).view(np.uint8).reshape(*words.shape, 4)
        return cv2.cvtColor(out, cv2.COLOR_RGBA2RGB).reshape(*t.shape[:-1], 3)


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
