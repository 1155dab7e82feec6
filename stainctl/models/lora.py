"""LoRA adapters with peft: a small adapter per site or stain look on a frozen base model.

On a fast generator the adapter sits on the decoder's convolutions (where the stain is rendered)
and the output head; the encoder, which reads the H&E structure, stays as the base has it. On
PixCell it sits on the cross-attention projections, as in the CK7 kidney study. An adapted model
is its base model's card plus `adapter.safetensors` (the LoRA weights, float32, with their
configuration in the metadata), merged into the base network when loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError

# Full-match regex over module names: the decoder convolutions and the output head.
DECODER_TARGETS = r"(mid\.\d+\.[ab]|ups\.\d+\.conv|head)"
CROSS_ATTENTION_TARGETS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 4
    alpha: float = 4.0
    targets: str = DECODER_TARGETS
    dropout: float = 0.0


def _peft() -> Any:
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()  # peft imports transformers, which imports torchvision
    try:
        import peft
    except ImportError as err:
        raise ModelError("LoRA needs peft: pip install -c constraints.txt 'stainctl[train]' "
                         f"({err})") from None
    return peft


def attach(generator: Any, spec: LoraSpec) -> Any:
    """The generator with fresh LoRA adapters; only the adapters train (peft freezes the rest,
    and initialises each adapter's B to zero, so the adapted model starts as the base)."""
    peft = _peft()
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=spec.targets, bias="none")
    return peft.get_peft_model(generator, config)


def adapter_state(model: Any) -> dict[str, Any]:
    return dict(_peft().get_peft_model_state_dict(model))


def save_adapter(model: Any, path: Path, spec: LoraSpec) -> None:
    from safetensors.torch import save_file

    from stainctl.workspace.atomic import atomic_path

    tensors = {k: v.detach().float().contiguous() for k, v in adapter_state(model).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"lora": json.dumps(asdict(spec))})


def load_adapted(generator: Any, path: Path) -> Any:
    """`generator` with the adapter at `path` merged into its weights (a plain generator)."""
    from safetensors import safe_open

    from stainctl.models.weights import load_state_dict

    try:
        with safe_open(str(path), framework="pt") as fh:
            spec = LoraSpec(**json.loads((fh.metadata() or {})["lora"]))
    except Exception as err:
        raise ModelError(f"{path} is not a stainctl LoRA adapter (safetensors with its LoRA "
                         f"configuration in the metadata): {err}") from None
    model = attach(generator, spec)
    result = _peft().set_peft_model_state_dict(model, load_state_dict(path))
    if result.unexpected_keys:
        raise ModelError(f"{path} does not fit its base model: unexpected "
                         f"{', '.join(result.unexpected_keys[:3])}")
    return model.merge_and_unload()
