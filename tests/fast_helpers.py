"""Helpers shared by the fast engine's loss tests."""

from __future__ import annotations

import numpy as np
import torch


def to_model_range(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> a 1x3xHxW float tensor in the generator's [-1, 1] range."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
