"""Training the `fast` generator from unpaired H&E and IHC images.

Losses (unpaired, as in the CK7 study's setting):
  * adversarial: a PatchGAN discriminator sees generated and real IHC crops, never the H&E
    (least-squares GAN);
  * identity: an IHC crop given to the generator comes back unchanged;
  * structure: the grey-level edges of the output follow those of the H&E input (the edge loss of
    UNIStainNet, which needs no pairing);
  * DAB statistics: mean and spread of the DAB channel (colour deconvolution with scikit-image's
    H-E-DAB matrix) match the real IHC batch.
Reproducible with a seed; checkpoints (safetensors weights + optimiser state) every few steps;
a run resumes from its last checkpoint.

    python -m stainctl.engines.fast.train --he A.svs B.tif --ihc C.tif D.png --marker ki67 \
        --steps 2000 --out runs/ki67
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stainctl.engines.fast.model import FastConfig, FastGenerator, parameter_count


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
    checkpoint_every: int = 200
    seed: int = 0
    model: FastConfig = field(default_factory=FastConfig)


# --- data ---------------------------------------------------------------------------------
def load_image(path: str | Path, mpp: float, default_mpp: float | None = None) -> np.ndarray:
    """A whole (small) image or slide at `mpp` µm/px, RGB uint8."""
    import cv2

    from stainctl.slide.reader import open_slide

    slide = open_slide(Path(path))
    if slide.mpp is None and default_mpp is not None:
        slide.close()
        slide = open_slide(Path(path), default_mpp)
    try:
        src_mpp = slide.require_mpp()
        level = slide.best_level(mpp / src_mpp)
        w, h = slide.level_dimensions[level]
        rgb = slide.read_region(0, 0, level, w, h)
        scale = src_mpp * slide.level_downsamples[level] / mpp
    finally:
        slide.close()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class CropSampler:
    """Random square crops with flips and quarter turns, from a few whole images."""

    def __init__(self, images: Sequence[np.ndarray], crop: int, rng: np.random.Generator,
                 min_tissue: float = 0.5) -> None:
        self.images = [im for im in images if min(im.shape[:2]) >= crop]
        if not self.images:
            raise ValueError(f"no image is at least {crop} px at the training resolution")
        self.crop, self.rng, self.min_tissue = crop, rng, min_tissue

    def sample(self, n: int) -> torch.Tensor:
        out: list[np.ndarray] = []
        while len(out) < n:
            im = self.images[self.rng.integers(len(self.images))]
            y = self.rng.integers(im.shape[0] - self.crop + 1)
            x = self.rng.integers(im.shape[1] - self.crop + 1)
            c = im[y:y + self.crop, x:x + self.crop]
            if (c.mean(axis=2) < 220).mean() < self.min_tissue:
                continue  # mostly glass: teaches nothing
            c = np.rot90(c, int(self.rng.integers(4)))
            if self.rng.integers(2):
                c = c[:, ::-1]
            out.append(np.ascontiguousarray(c))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1


# --- losses -------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """70-px receptive field PatchGAN (no normalisation on the first layer)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.GroupNorm(8, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 4, 1, 1), nn.GroupNorm(8, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.net(x))


def _hed_matrix() -> torch.Tensor:
    from skimage.color import hed_from_rgb

    return torch.as_tensor(np.asarray(hed_from_rgb), dtype=torch.float32)


def dab_channel(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """DAB optical density per pixel of images in [-1, 1], as skimage.color.rgb2hed computes it
    (differentiable)."""
    rgb = ((x + 1) / 2).clamp(1e-6, 1).permute(0, 2, 3, 1)
    od = torch.log(rgb) / math.log(1e-6)
    return torch.clamp(od @ matrix, min=0)[..., 2]


def dab_stats_loss(fake: torch.Tensor, real: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    a, b = dab_channel(fake, matrix), dab_channel(real, matrix)
    return (a.mean() - b.mean()).abs() + (a.std() - b.std()).abs()


def edges(x: torch.Tensor) -> torch.Tensor:
    grey = x.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device) / 4
    k = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(grey, k, padding=1)
    # Normalised per image: stains change contrast, structure should stay.
    return g / (g.flatten(1).std(dim=1)[:, None, None, None] + 1e-6)


# --- the loop -----------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int
    history: list[dict[str, float]]


def train(he: Sequence[np.ndarray], ihc: Sequence[np.ndarray], config: TrainConfig,
          out: Path, log: bool = True,
          generator: nn.Module | None = None) -> tuple[nn.Module, TrainState]:
    """Train a new generator, or only the trainable parameters of `generator` (a base model
    with LoRA adapters, whose other weights are frozen)."""
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
    matrix = _hed_matrix()
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
        dab = dab_stats_loss(fake, y, matrix)
        g_loss = (config.w_adv * adv + config.w_identity * identity
                  + config.w_structure * structure + config.w_dab * dab)
        g_loss.backward()
        opt_g.step()
        state.step += 1
        d_loss, adv, identity, structure, dab, g_loss = (v.detach() for v in (
            d_loss, adv, identity, structure, dab, g_loss))
        state.history.append({"step": state.step, "d": float(d_loss), "adv": float(adv),
                              "identity": float(identity), "structure": float(structure),
                              "dab": float(dab), "g": float(g_loss)})
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


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the fast generator (unpaired H&E -> IHC).")
    ap.add_argument("--he", nargs="+", required=True, help="H&E slides or images")
    ap.add_argument("--ihc", nargs="+", required=True, help="IHC slides or images")
    ap.add_argument("--marker", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--default-mpp", type=float, default=0.5,
                    help="µm/px of images without it (e.g. PNG)")
    args = ap.parse_args(argv)
    config = TrainConfig(marker=args.marker, crop=args.crop, batch=args.batch, steps=args.steps,
                         seed=args.seed, model=FastConfig(markers=(args.marker,)))
    he = [load_image(p, config.mpp, args.default_mpp) for p in args.he]
    ihc = [load_image(p, config.mpp, args.default_mpp) for p in args.ihc]
    gen, state = train(he, ihc, config, args.out)
    export(gen, args.out / "generator.safetensors")  # type: ignore[arg-type]
    (args.out / "history.json").write_text(json.dumps(state.history))
    print(f"done: {state.step} steps, {parameter_count(gen) / 1e6:.2f} M parameters -> "
          f"{args.out / 'generator.safetensors'}")


if __name__ == "__main__":
    main()
