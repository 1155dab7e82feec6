"""Training the `fast` generator from unpaired H&E and IHC images.

Losses (unpaired, as in the CK7 study's setting):
  * adversarial: a PatchGAN discriminator sees generated and real IHC crops, never the H&E
    (least-squares GAN);
  * identity: an IHC crop given to the generator comes back unchanged;
  * structure: the grey-level edges of the output follow those of the H&E input (the edge loss of
    UNIStainNet, which needs no pairing);
  * DAB statistics: mean and spread of the DAB channel (colour deconvolution with scikit-image's
    H-E-DAB matrix) match the real IHC batch;
  * glass: where the H&E is bright and unstained (glass), the output keeps the input's pixels.
    Training crops are mostly tissue, so without it nothing stops the generator from tinting
    glass (a seed of the demo model did).
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
    w_glass: float = 5.0
    # Paired (roughly aligned serial sections) only: losses that a 10-50 px shift barely moves.
    w_lowres: float = 10.0  # L1 of 1/lowres_factor average-pooled images
    w_fm: float = 1.0  # discriminator feature statistics (per-channel spatial mean and std)
    lowres_factor: int = 16
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


def hold_out(image: np.ndarray, fraction: float, crop: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training part, held-out part) of one image: a right-hand strip a whole number of crops
    wide (about `fraction` of the width, at least one crop) is held out, so no training crop
    overlaps an evaluation crop. An image too narrow to keep a crop on each side is not split."""
    if fraction <= 0:
        return image, None
    width = image.shape[1]
    strip = crop * max(1, round(fraction * width / crop))
    if width - strip < crop:
        return image, None
    return image[:, :width - strip], image[:, width - strip:]


def held_out_crops(strip: np.ndarray, crop: int, min_tissue: float = 0.5) -> list[np.ndarray]:
    """Non-overlapping `crop`-px squares of a held-out strip, top to bottom, that are mostly
    tissue (the training sampler's own rule)."""
    out = []
    for y in range(0, strip.shape[0] - crop + 1, crop):
        for x in range(0, strip.shape[1] - crop + 1, crop):
            c = strip[y:y + crop, x:x + crop]
            if (c[..., :3].mean(axis=2) < 220).mean() >= min_tissue:
                out.append(c)
    return out


def write_held_out(ihc: dict[str, np.ndarray], fraction: float, crop: int,
                   folder: Path) -> dict[str, np.ndarray]:
    """Split each named IHC image, write its held-out crops as PNGs (`<name>_<k>.png`) into
    `folder` for `stainctl evaluate --real`, and return the training parts."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):  # from a run with another split
        stale.unlink()
    kept = {}
    for name, image in ihc.items():
        kept[name], strip = hold_out(image, fraction, crop)
        for k, c in enumerate(held_out_crops(strip, crop) if strip is not None else []):
            if not cv2.imwrite(str(folder / f"{name}_{k}.png"), c[..., ::-1]):
                raise OSError(f"could not write {folder / f'{name}_{k}.png'}")
    return kept


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
            if (c[..., :3].mean(axis=2) < 220).mean() < self.min_tissue:
                continue  # mostly glass: teaches nothing
            c = np.rot90(c, int(self.rng.integers(4)))
            if self.rng.integers(2):
                c = c[:, ::-1]
            out.append(np.ascontiguousarray(c))
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1


class PairSampler:
    """The same random crop (and flip, turn) of each aligned H&E/IHC pair: (H&E, IHC)."""

    def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], crop: int,
                 rng: np.random.Generator) -> None:
        stacked = []
        for he, ihc in pairs:
            if he.shape != ihc.shape:
                raise ValueError(f"a pair must have one shape, got {he.shape} and {ihc.shape}")
            stacked.append(np.concatenate([he, ihc], axis=2))
        self.sampler = CropSampler(stacked, crop, rng)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.sampler.sample(n)
        return both[:, :3], both[:, 3:]


def load_pair(he_path: str | Path, ihc_path: str | Path, mpp: float,
              default_mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An H&E image and the IHC of a serial section, in the H&E's frame at `mpp`: registered by
    an affine fit of their landmarks where ANHIR-style CSVs lie beside both (`,X,Y`, in the
    files' own pixels), else resized onto it. IHC pixels outside the section become glass."""
    import cv2

    from stainctl.evaluate.paired import (
        landmarks_beside,
        read_landmarks,
        register_landmarks,
        warp_onto,
    )
    from stainctl.slide.reader import open_slide

    he, ihc = load_image(he_path, mpp, default_mpp), load_image(ihc_path, mpp, default_mpp)
    lh, li = landmarks_beside(Path(he_path)), landmarks_beside(Path(ihc_path))
    if lh is None or li is None:
        return he, cv2.resize(ihc, (he.shape[1], he.shape[0]), interpolation=cv2.INTER_AREA)

    def scaled(csv: Path, image: Path, loaded: np.ndarray) -> dict[str, np.ndarray]:
        slide = open_slide(image, default_mpp)
        width = slide.dimensions[0]
        slide.close()
        return {k: v * loaded.shape[1] / width for k, v in read_landmarks(csv).items()}

    reg = register_landmarks(scaled(lh, Path(he_path), he), scaled(li, Path(ihc_path), ihc),
                             he.shape[:2])
    warped, inside = warp_onto(ihc, reg.matrix, he.shape[:2])
    warped[~inside] = 255
    return he, warped


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

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each LeakyReLU (for feature matching)."""
        out = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out


def lowres_l1(fake: torch.Tensor, target: torch.Tensor, factor: int) -> torch.Tensor:
    """L1 after average pooling by `factor`: a shift much smaller than `factor` px barely
    changes it, a wrong stain does."""
    size = (max(1, fake.shape[-2] // factor), max(1, fake.shape[-1] // factor))
    return (F.adaptive_avg_pool2d(fake, size) - F.adaptive_avg_pool2d(target, size)).abs().mean()


def feature_matching(disc: PatchDiscriminator, fake: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    """Distance of the discriminator's per-channel feature statistics (spatial mean and std),
    which do not depend on where in the crop things are."""
    loss = fake.new_zeros(())
    with torch.no_grad():
        ref = disc.features(target)
    for a, b in zip(disc.features(fake), ref, strict=True):
        loss = loss + (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs().mean() \
            + (a.std(dim=(2, 3)) - b.std(dim=(2, 3))).abs().mean()
    return loss / len(ref)


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


def glass_loss(fake: torch.Tensor, he: torch.Tensor, bright: float = 0.8,
               grey: float = 0.1) -> torch.Tensor:
    """Mean L1 between output and input over the H&E's glass pixels: bright (mean > `bright`,
    about 230 of 255) and unstained (channel spread < `grey`, about 13 levels); images in
    [-1, 1]."""
    mask = ((he.mean(dim=1, keepdim=True) > bright)
            & ((he.amax(dim=1, keepdim=True) - he.amin(dim=1, keepdim=True)) < grey)).float()
    return ((fake - he).abs() * mask).sum() / (3 * mask.sum()).clamp_min(1.0)


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
    ap.add_argument("--hold-out", type=float, default=0.0, metavar="FRACTION",
                    help="keep about this fraction of each IHC image (a right-hand strip) out of "
                         "training; its crops go to OUT/held_out/ for `stainctl evaluate --real`")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("HE", "IHC"),
                    help="a roughly aligned H&E/IHC pair (serial sections; registered on "
                         "landmark CSVs beside them when present); repeatable")
    args = ap.parse_args(argv)
    config = TrainConfig(marker=args.marker, crop=args.crop, batch=args.batch, steps=args.steps,
                         seed=args.seed, model=FastConfig(markers=(args.marker,)))
    he = [load_image(p, config.mpp, args.default_mpp) for p in args.he]
    names = [Path(p).name.split(".")[0] for p in args.ihc]
    if len(set(names)) < len(names):
        ap.error("--ihc: two images share a name; their held-out crops would collide")
    ihc = {n: load_image(p, config.mpp, args.default_mpp)
           for n, p in zip(names, args.ihc, strict=True)}
    if args.hold_out > 0:
        ihc = write_held_out(ihc, args.hold_out, config.crop, args.out / "held_out")
    pairs = [load_pair(a, b, config.mpp, args.default_mpp) for a, b in args.pair]
    gen, state = train(he, list(ihc.values()), config, args.out, pairs=pairs)
    export(gen, args.out / "generator.safetensors")  # type: ignore[arg-type]
    (args.out / "history.json").write_text(json.dumps(state.history))
    print(f"done: {state.step} steps, {parameter_count(gen) / 1e6:.2f} M parameters -> "
          f"{args.out / 'generator.safetensors'}")


if __name__ == "__main__":
    main()
