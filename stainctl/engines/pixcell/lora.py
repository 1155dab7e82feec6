"""Stain adapters on the PixCell transformer: released LoRA checkpoints and train-lora's own.

The released per-marker files are full state dicts of a transformer with a peft adapter injected
(`...attn2.to_q.base_layer.weight`, `...attn2.to_q.lora_A.default.weight`, ...), sometimes wrapped
in a training checkpoint (`model_state_dict`). They are read with `weights_only=True`; only the
LoRA tensors are taken (the base weights in them are the frozen PixCell-1024 ones), attached with
peft at the rank their shapes give, and merged into the transformer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(?P<module>.+)\."
                       r"lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def released_lora_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """`<module>.lora_A.weight` / `<module>.lora_B.weight` tensors of a full state dict."""
    out = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            out[f"{m['module']}.lora_{m['ab']}.weight"] = value
    return out


def merge_released_lora(transformer: Any, path: Path, alpha: float | None = None) -> Any:
    """`transformer` with the LoRA of a released full-state-dict checkpoint merged in."""
    from stainctl.models.lora import LoraSpec, _peft, attach
    from stainctl.models.weights import load_state_dict

    tensors = released_lora_tensors(load_state_dict(path))
    if not tensors:
        raise ModelError(f"{path} holds no LoRA weights (keys with lora_A / lora_B)")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    missing = [m for m in modules if f"{m}.lora_A.weight" not in tensors
               or f"{m}.lora_B.weight" not in tensors]
    if missing:
        raise ModelError(f"{path}: LoRA weights of {missing[0]} are incomplete")
    rank = int(tensors[f"{modules[0]}.lora_A.weight"].shape[0])
    names = dict(transformer.named_modules())
    absent = [m for m in modules if m not in names]
    if absent:
        raise ModelError(f"{path} does not fit this transformer: it has no module {absent[0]}")
    targets = "(" + "|".join(re.escape(m) for m in modules) + ")"
    model = attach(transformer, LoraSpec(rank=rank, alpha=float(alpha or rank),
                                         targets=targets))
    state = {f"base_model.model.{k}": v.float() for k, v in tensors.items()}
    result = _peft().set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ModelError(f"{path} does not fit this transformer: unexpected "
                         f"{', '.join(result.unexpected_keys[:3])}")
    return model.merge_and_unload()
