"""`train-lora --engine fast`: adapt an installed fast model to new IHC images with LoRA.

Unpaired, with the losses the base model was trained with (PatchGAN on the new IHC, identity,
H&E-to-output edges, DAB statistics); only the adapters train. The result is a model folder —
card, adapter, loss history and curve — that `translate --marker NAME` uses as soon as it is in
the models directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stainctl.errors import ModelError, UsageError
from stainctl.models.adapted import ADAPTER, loss_curve
from stainctl.models.card import NAME_RULE, ModelCard, WeightFile, valid_name, write_card
from stainctl.models.lora import LoraSpec


@dataclass(frozen=True)
class AdaptOptions:
    name: str
    marker: str
    base: str
    he: tuple[Path, ...]
    ihc: tuple[Path, ...]
    out: Path
    models_dir: Path
    lora: LoraSpec = field(default_factory=LoraSpec)
    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 4
    crop: int = 256
    seed: int = 0
    default_mpp: float | None = None  # for images without a pixel size (PNG)

    def __post_init__(self) -> None:
        if not self.he or not self.ihc:
            raise UsageError("train-lora --engine fast needs H&E (--he) and IHC (--ihc) images")
        if not valid_name(self.name):
            raise UsageError(f"--name {self.name!r}: {NAME_RULE}")
        if self.steps < 1 or self.lora.rank < 1 or self.batch_size < 1:
            raise UsageError("--steps, --rank and --batch-size must be at least 1")


@dataclass(frozen=True)
class AdaptResult:
    card: Path
    adapter: Path
    steps: int
    trainable: int
    frozen: int
    final_loss: float
    curve: Path


def check_base(base: ModelCard) -> None:
    if base.engine != "fast" or base.kind != "marker":
        raise ModelError(f"--base {base.name} is a {base.engine} {base.kind}; the fast engine "
                         "adapts a `fast` marker model (e.g. demo-ki67)")


def adapt(options: AdaptOptions, base: ModelCard, he: list[np.ndarray], ihc: list[np.ndarray],
          log: bool = True) -> AdaptResult:
    """LoRA on `base` from H&E and IHC images already at the base model's µm/px."""
    from stainctl.engines.fast.engine import load_generator
    from stainctl.engines.fast.train import TrainConfig, train
    from stainctl.models.lora import attach, save_adapter

    check_base(base)
    mpp = float(base.input_mpp or 0.5)
    model = attach(load_generator(base, options.models_dir), options.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    config = TrainConfig(marker=str(base.marker), crop=options.crop, batch=options.batch_size,
                         steps=options.steps, lr=options.lr, mpp=mpp, seed=options.seed,
                         checkpoint_every=max(1, min(100, options.steps)))
    options.out.mkdir(parents=True, exist_ok=True)
    model, state = train(he, ihc, config, options.out / "lora-run", log=log, generator=model)
    adapter = options.out / ADAPTER
    save_adapter(model, adapter, options.lora)
    (options.out / "history.json").write_text(json.dumps(state.history))
    curve = loss_curve(state.history, options.out / "loss.png",
                       keys=("g", "d", "adv", "identity", "structure", "dab"))
    card = write_card(_card(options, base), options.out / "card.toml")
    return AdaptResult(card, adapter, state.step, trainable, frozen,
                       float(state.history[-1]["g"]) if state.history else float("nan"), curve)


def _card(options: AdaptOptions, base: ModelCard) -> ModelCard:
    files = ", ".join(p.name for p in (*options.he, *options.ihc))
    how = (f"LoRA (rank {options.lora.rank}, alpha {options.lora.alpha}) on {base.name}, "
           f"{options.steps} steps, seed {options.seed}, unpaired: {files}")
    return ModelCard(
        name=options.name, kind="marker", engine="fast", marker=options.marker,
        input_mpp=float(base.input_mpp or 0.5), tile_size=int(base.tile_size or 512),
        licence=f"as the base model {base.name} and the training images",
        intended_use=f"Research only; adapted from {base.name} and not validated.",
        training_data=how,
        architecture={"margin": int(base.architecture.get("margin", 32)), "base": base.name,
                      "base_marker": str(base.marker), "rank": options.lora.rank,
                      "alpha": options.lora.alpha},
        weights=(WeightFile(role="adapter", path=ADAPTER),))
