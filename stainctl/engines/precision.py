"""The precision an engine computes in (`--dtype`), shared by every engine."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from stainctl.errors import UsageError

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`--dtype` (engines.base.DTYPES) on `device`: auto is bf16 on a GPU, fp32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a GPU; on a CPU use bf16 or fp32")
    return TORCH_DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to `dtype` on `device`; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
