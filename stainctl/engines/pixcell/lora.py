"""Stain adapters on the PixCell transformer: released LoRA checkpoints and train-lora's own.

The released per-marker files are full state dicts of a transformer with a peft adapter injected
(`...attn2.to_q.base_layer.weight`, `...attn2.to_q.lora_A.default.weight`, ...), sometimes wrapped
in a training checkpoint (`model_state_dict`). They are read with `weights_only=True`; only the
LoRA tensors are taken, attached with peft at the rank their shapes give, and merged into the
transformer. The base weights they also hold (`...base_layer.weight`) should be the frozen
PixCell-1024 ones: a few are compared with the loaded transformer first, and a LoRA trained on
another base is refused rather than merged into the wrong one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError

_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(?P<module>.+)\."
                       r"base_layer\.(?P<kind>weight|bias)$")
BASE_CHECKS = 4  # base tensors compared at load: enough to catch another base, cheap at 600 M

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


def check_base_weights(transformer: Any, state: dict[str, Any], path: Path,
                       checks: int = BASE_CHECKS) -> int:
    """Compare up to `checks` `...base_layer.weight` tensors of a released LoRA checkpoint
    (spread over its layers) with `transformer`'s; raise when one differs. Returns how many
    were compared (0 for a file without base weights)."""
    import torch

    keys = sorted(k for k in state if (m := _BASE_KEY.match(k)) and m["kind"] == "weight")
    if not keys:
        return 0
    picked = [keys[round(i * (len(keys) - 1) / max(1, checks - 1))]
              for i in range(min(checks, len(keys)))]
    own = dict(transformer.named_parameters())
    for key in dict.fromkeys(picked):
        m = _BASE_KEY.match(key)
        assert m is not None
        name = f"{m['module']}.weight"
        theirs = state[key]
        mine = own.get(name)
        if mine is None or tuple(mine.shape) != tuple(theirs.shape):
            raise ModelError(f"{path} was trained on another base transformer: its {key} "
                             f"{tuple(theirs.shape)} has no counterpart of that shape in the "
                             "loaded one; use the LoRA with the base it was made for")
        a, b = mine.detach().float().cpu(), theirs.float()
        # bf16 storage rounds to ~0.4 %: a LoRA of the same base stays well inside 1 %.
        if not torch.allclose(a, b, rtol=1e-2, atol=1e-4):
            diff = float((a - b).abs().max())
            raise ModelError(f"{path} was trained on another base transformer: its {key} "
                             f"differs from the loaded {name} (max difference {diff:.3g}); "
                             "merging it would give a different model than the one released. "
                             "Use the LoRA with the base it was made for (its card's base)")
    return len(dict.fromkeys(picked))


def merge_released_lora(transformer: Any, path: Path, alpha: float | None = None) -> Any:
    """`transformer` with the LoRA of a released full-state-dict checkpoint merged in, after
    checking that the checkpoint's base weights are this transformer's."""
    from stainctl.models.lora import LoraSpec, _peft, attach
    from stainctl.models.weights import load_state_dict

    state = load_state_dict(path)
    check_base_weights(transformer, state, path)
    tensors = released_lora_tensors(state)
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
