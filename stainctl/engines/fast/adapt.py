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
from typing import Any

from stainctl.errors import ModelError, UsageError
from stainctl.models.adapted import ADAPTER, loss_curve, toml_string, write_card
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

    def validate(self) -> None:
        if not self.he or not self.ihc:
            raise UsageError("train-lora --engine fast needs H&E (--he) and IHC (--ihc) images")
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


def adapt(options: AdaptOptions, log: bool = True) -> AdaptResult:
    options.validate()
    from stainctl.engines.fast.engine import load_generator
    from stainctl.engines.fast.train import TrainConfig, load_image, train
    from stainctl.models.lora import attach, save_adapter
    from stainctl.models.registry import get_card

    base = get_card(options.base, options.models_dir)
    if base.engine != "fast" or base.kind != "marker":
        raise ModelError(f"--base {base.name} is a {base.engine} {base.kind}; the fast engine "
                         "adapts a `fast` marker model (e.g. demo-ki67)")
    mpp = float(base.input_mpp or 0.5)
    he = [load_image(p, mpp, options.default_mpp) for p in options.he]
    ihc = [load_image(p, mpp, options.default_mpp) for p in options.ihc]
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
    card = write_card(options.out / "card.toml", _card_lines(options, base))
    return AdaptResult(card, adapter, state.step, trainable, frozen,
                       float(state.history[-1]["g"]) if state.history else float("nan"), curve)


def _card_lines(options: AdaptOptions, base: Any) -> list[str]:
    q = toml_string
    files = ", ".join(p.name for p in (*options.he, *options.ihc))
    how = (f"LoRA (rank {options.lora.rank}, alpha {options.lora.alpha}) on {base.name}, "
           f"{options.steps} steps, seed {options.seed}, unpaired: {files}")
    return [
        f"name = {q(options.name)}",
        'kind = "marker"',
        'engine = "fast"',
        f"marker = {q(options.marker)}",
        f"input_mpp = {float(base.input_mpp or 0.5)}",
        f"tile_size = {int(base.tile_size or 512)}",
        f"licence = {q('as the base model ' + base.name + ' and the training images')}",
        f"intended_use = {q('Research only; adapted from ' + base.name + ' and not validated.')}",
        f"training_data = {q(how)}",
        "",
        "[architecture]",
        f"margin = {int(base.architecture.get('margin', 32))}",
        f"base = {q(base.name)}",
        f"base_marker = {q(str(base.marker))}",
        f"rank = {options.lora.rank}",
        f"alpha = {options.lora.alpha}",
        "",
        "[[weights]]",
        'role = "adapter"',
        f"path = {q(ADAPTER)}",
        "",
    ]
