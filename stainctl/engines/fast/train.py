"""The training loop of the `fast` generator, from unpaired H&E and IHC images.

Losses (unpaired, as in the CK7 study's setting):
  * adversarial: a PatchGAN discriminator sees generated and real IHC crops, never the H&E
    (least-squares GAN);
  * identity: an IHC crop given to the generator comes back unchanged;
  * structure: the grey-level edges of the output follow those of the H&E input (the edge loss of
    UNIStainNet, which needs no pairing);
  * DAB statistics: mean and spread of the DAB channel (colour deconvolution, `stain/`, as the
    evaluation computes it) match the real IHC batch;
  * glass: where the H&E is bright and unstained (glass), the output keeps the input's pixels.
    Training crops are mostly tissue, so without it nothing stops the generator from tinting
    glass (a seed of the demo model did).
Reproducible with a seed; checkpoints (safetensors weights + optimiser state) every few steps;
a run resumes from its last checkpoint. Data: `data.py`; losses: `losses.py`; the step that
prepares the images and installs the model: `steps/train.py` (`stainctl train`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stainctl.engines.fast.data import CropSampler, PairSampler
from stainctl.engines.fast.losses import (
    PatchDiscriminator,
    dab_stats_loss,
    edges,
    feature_matching,
    glass_loss,
    lowres_l1,
)
from stainctl.engines.fast.model import FastConfig, FastGenerator


@dataclass(frozen=True)
class TrainConfig:
    marker: str = "ki67"
    crop: int = 256
    batch: int = 4
    steps: int = 2000
    lr: float = 2e-4
    mpp: float = 0.5  # images are brought to this µm/px before cropping
    w_adv: float = 1.0
    w_identity: float = 5.0
    w_structure: float = 10.0
    w_dab: float = 2.0
    w_glass: float = 5.0
    # Paired (roughly aligned serial sections) only: losses that a 10-50 px shift barely moves.
    w_lowres: float = 10.0  # L1 of 1/lowres_factor average-pooled images
    w_fm: float = 1.0  # discriminator feature statistics (per-channel spatial mean and std)
    lowres_factor: int = 16
    checkpoint_every: int = 200
    seed: int = 0
    model: FastConfig = field(default_factory=FastConfig)


@dataclass
class TrainState:
    step: int
    history: list[dict[str, float]]


def train(he: Sequence[np.ndarray], ihc: Sequence[np.ndarray], config: TrainConfig,
          out: Path, log: bool = True, generator: nn.Module | None = None,
          pairs: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> tuple[nn.Module, TrainState]:
    """Train a new generator, or only the trainable parameters of `generator` (a base model
    with LoRA adapters, whose other weights are frozen). `pairs`: roughly aligned H&E/IHC
    images (`load_pair`), which add the misalignment-robust paired losses."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if generator is None:
        model_config = config.model if config.marker in config.model.markers else \
            FastConfig(**{**asdict(config.model), "markers": (config.marker,)})
        generator = FastGenerator(model_config)
    gen: Any = generator
    disc = PatchDiscriminator()
    opt_g = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=config.lr,
                             betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=(0.5, 0.999))
    state = TrainState(0, [])
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        gen.load_state_dict(saved["generator"])
        disc.load_state_dict(saved["discriminator"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        state = TrainState(int(saved["step"]), json.loads(saved["history"]))
        rng = np.random.default_rng([config.seed, state.step])
        torch.manual_seed(config.seed + state.step)
    he_crops = CropSampler(he, config.crop, rng)
    ihc_crops = CropSampler(ihc, config.crop, rng)
    pair_crops = PairSampler(pairs, config.crop, rng) if pairs else None
    marker = torch.full((config.batch,), gen.marker_index(config.marker), dtype=torch.long)
    t0 = time.perf_counter()
    while state.step < config.steps:
        x, y = he_crops.sample(config.batch), ihc_crops.sample(config.batch)
        fake = gen(x, marker)
        # Discriminator: real IHC -> 1, generated -> 0.
        opt_d.zero_grad()
        d_loss = 0.5 * (((disc(y) - 1) ** 2).mean() + (disc(fake.detach()) ** 2).mean())
        d_loss.backward()
        opt_d.step()
        # Generator.
        opt_g.zero_grad()
        adv = ((disc(fake) - 1) ** 2).mean()
        identity = (gen(y, marker) - y).abs().mean()
        structure = (edges(fake) - edges(x)).abs().mean()
        dab = dab_stats_loss(fake, y)
        glass = glass_loss(fake, x)
        g_loss = (config.w_adv * adv + config.w_identity * identity
                  + config.w_structure * structure + config.w_dab * dab
                  + config.w_glass * glass)
        paired: dict[str, float] = {}
        if pair_crops is not None:
            xp, yp = pair_crops.sample(config.batch)
            fake_p = gen(xp, marker)
            lowres = lowres_l1(fake_p, yp, config.lowres_factor)
            fm = feature_matching(disc, fake_p, yp)
            g_loss = g_loss + config.w_lowres * lowres + config.w_fm * fm
            paired = {"lowres": float(lowres.detach()), "fm": float(fm.detach())}
        g_loss.backward()
        opt_g.step()
        state.step += 1
        d_loss, adv, identity, structure, dab, glass, g_loss = (v.detach() for v in (
            d_loss, adv, identity, structure, dab, glass, g_loss))
        state.history.append({"step": state.step, "d": float(d_loss), "adv": float(adv),
                              "identity": float(identity), "structure": float(structure),
                              "dab": float(dab), "glass": float(glass), **paired,
                              "g": float(g_loss)})
        if log and state.step % 20 == 0:
            h = state.history[-1]
            print(f"step {state.step} {time.perf_counter() - t0:.0f}s " +
                  " ".join(f"{k}={v:.3f}" for k, v in h.items() if k != "step"), flush=True)
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            save_checkpoint(ckpt, gen, disc, opt_g, opt_d, state)
    return gen, state


def save_checkpoint(path: Path, gen: nn.Module, disc: nn.Module, opt_g: torch.optim.Optimizer,
                    opt_d: torch.optim.Optimizer, state: TrainState) -> None:
    from stainctl.workspace.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"generator": gen.state_dict(), "discriminator": disc.state_dict(),
                    "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                    "step": state.step, "history": json.dumps(state.history)}, tmp)


def export(gen: FastGenerator, path: Path) -> None:
    """The generator alone, float16 safetensors, with its configuration in the metadata."""
    from safetensors.torch import save_file

    from stainctl.workspace.atomic import atomic_path

    tensors = {k: v.detach().half().contiguous() for k, v in gen.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(gen.config.as_dict())})
