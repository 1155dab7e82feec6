"""Phikon (owkin/phikon, ViT-B/16 trained with iBOT on TCGA): its last hidden states (CLS and 196
patch tokens x 768) are what HistDiST's UNet cross-attends to when it translates.

Loaded with transformers' ViTModel (no pooling layer), from a hub id or a local folder; with
HF_HUB_OFFLINE set only local files are used. The image processor's configuration
(preprocessor_config.json: size, resample, mean, std) is read from the same place and applied
with torch (an antialiased resize of the whole tile, then normalisation), so tiles stay on the
device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import ModelError

# transformers' ViTImageProcessor defaults, used where a folder has no preprocessor_config.json.
PROCESSOR_DEFAULTS: dict[str, Any] = {"size": 224, "resample": 2, "image_mean": [0.5] * 3,
                                      "image_std": [0.5] * 3}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes -> torch modes


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _processor_config(source: str) -> dict[str, Any]:
    path = Path(source) / "preprocessor_config.json"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "preprocessor_config.json",
                                        local_files_only=offline()))
        except Exception:
            return dict(PROCESSOR_DEFAULTS)
    if not path.is_file():
        return dict(PROCESSOR_DEFAULTS)
    data = json.loads(path.read_text(encoding="utf-8"))
    return {**PROCESSOR_DEFAULTS, **{k: data[k] for k in PROCESSOR_DEFAULTS if k in data}}


class Phikon:
    def __init__(self, network: Any, processor: dict[str, Any], device: Any) -> None:
        import torch

        self.network = network.eval().requires_grad_(False).to(device)
        size = processor["size"]
        self.size = int(size.get("height", 224) if isinstance(size, dict) else size)
        self.mode = _RESAMPLE.get(int(processor["resample"]), "bilinear")
        self.mean = torch.tensor(processor["image_mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor["image_std"], device=device).view(1, 3, 1, 1)
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.network.config.hidden_size)

    def encode(self, images: Any, dtype: Any = None) -> Any:
        """(B, 3, H, W) float in [0, 1] on the device -> (B, tokens, 768) last hidden states."""
        import torch.nn.functional as F

        x = F.interpolate(images.float(), size=(self.size, self.size), mode=self.mode,
                          antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        if dtype is not None:
            x = x.to(dtype)
        return self.network(pixel_values=x).last_hidden_state

    def encode_uint8(self, tiles: np.ndarray) -> Any:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        return self.encode(x.permute(0, 3, 1, 2).float() / 255)


def load_phikon(source: str | Path, device: Any = "cpu") -> Phikon:
    """Phikon from a hub id ("owkin/phikon") or a folder with config.json and its weights."""
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    from transformers import ViTModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stainctl shows its own progress

    try:
        network = ViTModel.from_pretrained(str(source), add_pooling_layer=False,
                                           local_files_only=offline())
    except OSError as err:
        raise ModelError(f"Phikon could not be loaded from {source} "
                         f"({str(err).splitlines()[0]}); run `stainctl models pull phikon`"
                         ) from None
    return Phikon(network, _processor_config(str(source)), device)
