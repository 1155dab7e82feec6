"""Foundation-model encoders behind one interface: RGB tiles at the encoder's mpp in, tokens out.

A tile is cut into a grid of square crops, row by row (top-left first); each crop is resized to
the network's input size with one pinned transform (antialiased bilinear resize, then the card's
mean/std), so embeddings do not change when a library changes its defaults. Families:
  * crop-cls: one token per crop, the network's pooled CLS embedding (UNI2-h: a 1024-px tile gives
    4 x 4 crops of 256 px, 16 tokens x 1536);
  * crop-patches: the dense patch tokens of every crop (UNI as UNIStainNet uses it);
  * center-crop: one token per image, the whole image resized (shorter side) to `crop` px with
    bicubic interpolation and centre-cropped to `input_size` (Prov-GigaPath's published
    transform: Resize(256, bicubic), CenterCrop(224)), any image size.
The timm architecture and its keyword arguments come from the card, so tests build tiny
randomly initialised networks of the same classes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

FAMILIES = ("crop-cls", "crop-patches", "center-crop")
# Names a TOML card can use for timm's callable keyword arguments.
_CALLABLES = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU"),
              "GELU": ("torch.nn", "GELU")}


@dataclass(frozen=True)
class EncoderSpec:
    family: str
    timm_model: str
    crop: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_kwargs: dict[str, Any]

    @classmethod
    def from_card(cls, card: ModelCard) -> EncoderSpec:
        a = card.architecture
        if card.kind != "encoder":
            raise ModelError(f"{card.name} is a {card.kind} model, not an encoder")
        try:
            spec = cls(a["family"], a["timm_model"], int(a["crop"]), int(a["input_size"]),
                       tuple(a["mean"]), tuple(a["std"]),
                       dict(a.get("timm_kwargs", {})))
        except KeyError as err:
            raise ModelError(f"{card.origin}: [architecture] lacks {err}") from None
        if spec.family not in FAMILIES:
            raise ModelError(f"{card.origin}: family must be one of {', '.join(FAMILIES)}")
        return spec


def build_network(spec: EncoderSpec) -> Any:
    """The timm network with random weights."""
    import importlib

    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    import timm

    kwargs = dict(spec.timm_kwargs)
    for key, value in kwargs.items():
        if isinstance(value, str) and value in _CALLABLES:
            module, name = _CALLABLES[value]
            kwargs[key] = getattr(importlib.import_module(module), name)
    return timm.create_model(spec.timm_model, pretrained=False, **kwargs)


class TileEncoder:
    def __init__(self, name: str, spec: EncoderSpec, network: Any, mpp: float,
                 device: str = "cpu", dtype: str = "fp32") -> None:
        import torch

        self.name, self.spec, self.mpp = name, spec, mpp
        self.device = torch.device(device)
        self.dtype = dtype
        self.network = network.eval().to(self.device)
        self.dim = int(network.num_features)
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1) * 255

    @property
    def tokens_per_crop(self) -> int:
        if self.spec.family == "crop-cls":
            return 1
        ph, pw = self.network.patch_embed.patch_size
        return (self.spec.input_size // ph) * (self.spec.input_size // pw)

    def grid(self, tile_px: int) -> int:
        if self.spec.family == "center-crop":
            return 1
        if tile_px % self.spec.crop:
            raise ModelError(f"encoder {self.name} cuts tiles into {self.spec.crop}-px crops; "
                             f"a {tile_px}-px tile is not a whole number of them: tile with "
                             f"--tile-size {max(1, tile_px // self.spec.crop) * self.spec.crop}")
        return tile_px // self.spec.crop

    def tokens_per_tile(self, tile_px: int) -> int:
        return self.grid(tile_px) ** 2 * self.tokens_per_crop

    def crops(self, tiles: np.ndarray) -> Any:
        """(B, H, W, 3) uint8 -> (B * g * g, 3, input, input) normalised, crops row by row."""
        import torch
        import torch.nn.functional as F

        b, h, w, _ = tiles.shape
        if self.spec.family == "center-crop":
            return self._center_crop(tiles)
        if h != w:
            raise ModelError(f"encoder {self.name} takes square tiles, got {w} x {h}")
        g, c = self.grid(h), self.spec.crop
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        # (B, g, c, g, c, 3) -> (B, g_row, g_col, 3, c, c): crop (i, j) at index i * g + j.
        x = x.view(b, g, c, g, c, 3).permute(0, 1, 3, 5, 2, 4).reshape(b * g * g, 3, c, c)
        x = x.float()
        if c != self.spec.input_size:
            x = F.interpolate(x, size=(self.spec.input_size,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)
        return (x - self._mean) / self._std

    def _center_crop(self, tiles: np.ndarray) -> Any:
        import torch
        import torch.nn.functional as F

        _, h, w, _ = tiles.shape
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        short = self.spec.crop
        size = (short, max(short, round(w * short / h))) if h <= w else \
            (max(short, round(h * short / w)), short)
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0, 255)  # bicubic overshoots; PIL's resize saturates at 0 and 255
        n = self.spec.input_size
        top, left = (size[0] - n) // 2, (size[1] - n) // 2
        x = x[:, :, top:top + n, left:left + n]
        return (x - self._mean) / self._std

    def encode(self, tiles: np.ndarray, half: bool = False) -> Any:
        """(B, H, W, 3) uint8 tiles -> (B, tokens, dim) on the CPU, float32 (float16 with
        `half`: what is stored, and half the bytes to copy back from a GPU)."""
        import torch

        b = tiles.shape[0]
        x = self.crops(tiles)
        with torch.inference_mode(), self._autocast():
            if self.spec.family in ("crop-cls", "center-crop"):
                out = self.network(x)  # (N, dim): pooled CLS
                out = out.reshape(b, -1, self.dim)
            else:
                feats = self.network.forward_features(x)
                feats = feats[:, self.network.num_prefix_tokens:]
                out = feats.reshape(b, -1, self.dim)
        return (out.half() if half else out.float()).cpu()

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no CUDA GPU here "
                         f"(torch {torch.__version__}); use --device cpu")
    return device


def load_encoder(card: ModelCard, directory: Path, *, device: str = "auto",
                 dtype: str = "fp32") -> TileEncoder:
    """Build the card's network and load its weights (resolved locally, never downloaded)."""
    from stainctl.models.weights import load_state_dict, resolve

    spec = EncoderSpec.from_card(card)
    path = resolve(card, "encoder", directory)
    network = build_network(spec)
    state = load_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"model {card.name}: {path} does not fit the card's architecture "
                         f"({first})") from None
    if dtype not in ("fp32", "bf16"):
        raise ModelError(f"--dtype must be fp32 or bf16, got {dtype}")
    return TileEncoder(card.name, spec, network, card.input_mpp, resolve_device(device), dtype)
