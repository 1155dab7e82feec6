"""Feature extractors for the distribution metrics: Inception-v3 pool3 (FID/KID), or an encoder.

The Inception network is torchmetrics' `NoTrainInceptionV3` (torch-fidelity's port of the
TensorFlow FID network, the one every published FID uses). Its weights cannot be downloaded
offline; they are taken from `--inception-weights PATH` or the torch hub cache, checked, and
loaded as tensors only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import UsageError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)
# torch hub names cached files after the first hex digits of their sha256.
INCEPTION_SHA256_PREFIX = "6726825d"


def hub_checkpoints() -> Path:
    """$TORCH_HOME/hub/checkpoints (torch's default ~/.cache/torch when unset), read now."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights(path: str | os.PathLike[str] | None) -> Path:
    """The Inception weights file to use, or one error naming the file and where it goes."""
    candidate = Path(path) if path else hub_checkpoints() / INCEPTION_FILE
    if not candidate.is_file():
        where = f"{candidate} does not exist" if path else f"it is not in {candidate.parent}"
        raise UsageError(
            f"FID/KID need the Inception-v3 weights {INCEPTION_FILE}, and {where}. Download "
            f"{INCEPTION_URL} on a machine with internet and pass it with --inception-weights "
            f"PATH, or copy it to {hub_checkpoints() / INCEPTION_FILE}; or leave FID, CropFID "
            "and KID out with --metrics stain,paired,seams.")
    return candidate


def check_inception_file(path: Path, prefix: str = INCEPTION_SHA256_PREFIX) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise UsageError(
            f"{path}: not the FID Inception weights (sha256 {digest.hexdigest()[:12]}..., "
            f"expected {prefix}...); scores from other weights are not comparable with published "
            f"FID/KID. Download {INCEPTION_URL}.")


def load_inception(path: Path, *, verify: bool = True) -> Any:
    """torchmetrics' NoTrainInceptionV3 returning 2048-d pool3 features of uint8 images."""
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    import torch
    from torchmetrics.image.fid import NoTrainInceptionV3

    if verify:
        check_inception_file(path)
    # torch-fidelity loads the file with a full unpickler; loading it here first with
    # weights_only=True refuses anything but tensors, so that second load runs no code.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path}: not a plain tensor state dict ({err})") from err
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(path))


class EncoderFeatures:
    """A tile encoder as a feature extractor: the mean of its tokens per tile."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def __call__(self, images: np.ndarray) -> np.ndarray:
        tokens = self.encoder.encode(images)  # (B, tokens, dim) torch tensor on the CPU
        return tokens.float().numpy().mean(axis=1)


def extract(model: Any, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """(B, D) float32 features of (B, H, W, 3) uint8 images through a torch module that takes
    uint8 (B, 3, H, W) (Inception, or a test's own small network)."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).float().cpu().numpy()
