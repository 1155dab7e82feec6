"""Running a trained `fast` generator on batches of tiles (the engine interface)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.base import EngineOptions
from stainctl.errors import ModelError
from stainctl.models.card import ModelCard


class FastEngine:
    """uint8 RGB tiles (with their context margin) in, uint8 RGB tiles of the same size out
    (an `engines.base.Engine`)."""

    input_side: int | None = None  # fully convolutional: any multiple of `multiple`
    deterministic = True
    # Tiles a batch on a GPU unless --batch-size says: 788 tiles/s on an H200 against 467 at
    # the CPU's 8, where each call's transfers and launches dominate (bench/RESULTS.md).
    gpu_batch = 64

    def __init__(self, card: ModelCard, generator: Any, device: str = "cpu",
                 dtype: str = "auto") -> None:
        import torch

        from stainctl.engines.precision import resolve_dtype

        self.card = card
        self.device = torch.device(device)
        # fp32 unless asked: the network is small, and bf16 autocast bought 3 % on an H200
        # (bench/RESULTS.md, GPU figures) while changing the pixels.
        self.dtype = torch.float32 if dtype == "auto" else resolve_dtype(dtype, self.device)
        # On a GPU the convolutions run channels-last (NHWC), which is also the tiles' layout:
        # no transposes on either side of the network. A CPU keeps the layout the shipped
        # outputs were recorded with.
        self.channels_last = self.device.type == "cuda"
        self.generator = generator.eval().to(self.device)
        if self.channels_last:
            self.generator.to(memory_format=torch.channels_last)
        self.marker = card.marker
        # An adapted model renders through its base model's marker embedding.
        self.index = generator.marker_index(str(card.architecture.get("base_marker",
                                                                      card.marker)))
        # Context on each side of a tile: the generator is fully convolutional, so more context
        # means fewer border effects and a wider band to blend neighbours over.
        self.margin = int(card.architecture.get("margin", 32))
        self.multiple = 2 ** len(generator.config.widths)

    def settings(self) -> Mapping[str, object]:
        import torch

        # The model makes the pixels, and a reduced precision changes them (recorded, so a
        # change makes the slide again); fp32 records nothing, as before --dtype applied here.
        if self.dtype == torch.float32:
            return {}
        return {"dtype": str(self.dtype).removeprefix("torch.")}

    def close(self) -> None:
        self.generator.to("cpu")

    def translate(self, tiles: np.ndarray, seeds: Sequence[int] = ()) -> np.ndarray:
        del seeds  # deterministic: no noise to seed
        import torch

        b, h, w, _ = tiles.shape
        if h % self.multiple or w % self.multiple:
            raise ModelError(f"the fast engine needs tiles a multiple of {self.multiple} px, "
                             f"got {w} x {h}")
        from stainctl.engines.precision import autocast

        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        # NHWC seen as NCHW: a channels-last view, no copy.
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        marker = torch.full((b,), self.index, dtype=torch.long, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            y = self.generator(x, marker)
        y = ((y.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        # Back to NHWC where the tensor is (a no-op for channels-last output): copying a
        # transposed tensor to the host and transposing there took ~2 ms a tile on the host.
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def load_fast_engine(card: ModelCard, directory: Path,
                     options: EngineOptions | None = None) -> FastEngine:
    """The card's generator; for a LoRA-adapted card (`base` in its architecture), the base
    model's generator with the card's adapter merged in."""
    from stainctl.models.encoders import resolve_device

    options = options or EngineOptions(device="cpu")
    device = resolve_device(options.device)
    base = card.architecture.get("base")
    if not base:
        return FastEngine(card, load_generator(card, directory), device, options.dtype)
    from stainctl.models.lora import load_adapted
    from stainctl.models.registry import get_card
    from stainctl.models.weights import resolve

    base_card = get_card(str(base), directory)
    if base_card.engine != "fast" or base_card.architecture.get("base"):
        raise ModelError(f"model {card.name}: its base {base_card.name} must be a plain "
                         "`fast` model")
    generator = load_adapted(load_generator(base_card, directory),
                             resolve(card, "adapter", directory))
    return FastEngine(card, generator, device, options.dtype)


def load_generator(card: ModelCard, directory: Path) -> Any:
    from safetensors import safe_open

    from stainctl.engines.fast.model import FastConfig, FastGenerator
    from stainctl.models.weights import load_state_dict, resolve

    path = resolve(card, "generator", directory)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        raw = json.loads(meta["config"])
    except Exception as err:
        raise ModelError(f"model {card.name}: {path} is not a fast-engine generator "
                         f"(safetensors with its config in the metadata): {err}") from None
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    config = FastConfig(**fields)
    generator = FastGenerator(config)
    state = {k: v.float() for k, v in load_state_dict(path).items()}
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"model {card.name}: {path} does not fit its own config "
                         f"({str(err).splitlines()[0]})") from None
    return generator
