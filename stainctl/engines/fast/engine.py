"""Running a trained `fast` generator on batches of tiles (the engine interface)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import ModelError
from stainctl.models.card import ModelCard


class FastEngine:
    """uint8 RGB tiles (with their context margin) in, uint8 RGB tiles of the same size out."""

    def __init__(self, card: ModelCard, generator: Any, device: str = "cpu") -> None:
        import torch

        self.card = card
        self.device = torch.device(device)
        self.generator = generator.eval().to(self.device)
        self.marker = card.marker
        self.index = generator.marker_index(card.marker)
        # Context on each side of a tile: the generator is fully convolutional, so more context
        # means fewer border effects and a wider band to blend neighbours over.
        self.margin = int(card.architecture.get("margin", 32))
        self.multiple = 2 ** len(generator.config.widths)

    def translate(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        b, h, w, _ = tiles.shape
        if h % self.multiple or w % self.multiple:
            raise ModelError(f"the fast engine needs tiles a multiple of {self.multiple} px, "
                             f"got {w} x {h}")
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        marker = torch.full((b,), self.index, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            y = self.generator(x, marker)
        y = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return np.ascontiguousarray(y.permute(0, 2, 3, 1).cpu().numpy())


def load_fast_engine(card: ModelCard, directory: Path, device: str = "cpu") -> FastEngine:
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
    return FastEngine(card, generator, device)
