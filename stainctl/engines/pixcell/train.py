"""`train-lora --engine pixcell`: a stain LoRA on PixCell from unpaired IHC tiles (CK7 study).

`steps/train.py` prepares the training set: the IHC slides tiled and filtered into a workspace,
each kept tile embedded with the base model's encoder (the `embed` step) and encoded once by the
VAE here (`encode_latents`: latent mean and std, cached per slide beside the run). Training is the
ordinary noise-prediction loss on those latents, normalised as the sampler expects them
(`(z - shift) * scale` of the VAE's configuration, `config.LatentScaling`), conditioned on each
tile's own tokens, with 10 % of the conditions swapped for the stored unconditional embedding
(for guidance at inference); only a peft LoRA on the cross-attention projections trains.
AdamW, constant learning rate after a linear warm-up, gradient clipping, gradient accumulation,
bf16 autocast on a GPU. Every epoch's randomness comes from a generator seeded by (seed, epoch),
and a checkpoint is written after each epoch, so a killed run resumes from the last epoch and
ends as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.pixcell.config import LatentScaling
from stainctl.engines.pixcell.engine import PixCellParts
from stainctl.engines.pixcell.flow_train import FlowTrainOptions
from stainctl.errors import ModelError, UsageError
from stainctl.models.adapted import ADAPTER, loss_curve
from stainctl.models.card import NAME_RULE, ModelCard, WeightFile, valid_name, write_card
from stainctl.models.lora import CROSS_ATTENTION_TARGETS, LoraSpec
from stainctl.workspace import atomic_path


@dataclass(frozen=True)
class PixCellLoraOptions:
    name: str
    marker: str
    out: Path
    models_dir: Path
    base: str = "pixcell-1024"
    rank: int = 4
    alpha: float = 4.0
    epochs: int = 20
    lr: float = 1e-4
    batch_size: int = 4
    accumulate: int = 1  # batches per optimiser step
    warmup: int = 100  # optimiser steps of linear warm-up
    max_tiles_per_slide: int = 300
    uncond_prob: float = 0.1
    clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    flow: str | None = None  # a card whose flow MLP the adapted model uses at inference
    train_flow: FlowTrainOptions | None = None  # or a new flow MLP from paired tiles

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise UsageError(f"--name {self.name!r}: {NAME_RULE}")
        if min(self.rank, self.epochs, self.batch_size, self.accumulate,
               self.max_tiles_per_slide) < 1:
            raise UsageError("--rank, --epochs, --batch-size, --accumulate and "
                             "--max-tiles-per-slide must be at least 1")
        if not 0 <= self.uncond_prob < 1 or self.lr <= 0:
            raise UsageError("--lr must be positive and the unconditional rate in [0, 1)")
        if self.flow and self.train_flow:
            raise UsageError("give --flow (an existing flow MLP) or --train-flow, not both")

    def fingerprint(self) -> str:
        """What makes the training: a checkpoint made with other values is not resumed."""
        keep: dict[str, object] = {
            k: v for k, v in asdict(self).items()
            if k not in ("epochs", "out", "models_dir", "device", "name", "flow", "train_flow")}
        keep["latents"] = "(z - shift) * scale"  # runs before this trained on raw latents
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class TrainingSet:
    latents: list[np.ndarray]  # per slide (n, 2C, h, w) float16: mean then std
    tokens: list[np.ndarray]  # per slide (n, T, D) float16
    index: np.ndarray  # (N, 2): slide, row

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class PixCellLoraResult:
    card: Path
    adapter: Path
    epochs: int
    steps: int
    tiles: int
    trainable: int
    frozen: int
    final_loss: float
    curve: Path


def select_tiles(ids: np.ndarray, limit: int, seed: int, key: str) -> np.ndarray:
    """At most `limit` of a slide's tile ids, a fixed random choice per (seed, slide)."""
    if len(ids) <= limit:
        return np.sort(ids)
    from stainctl.engines.base import stable_seed

    rng = np.random.default_rng(stable_seed(seed, key))
    return np.sort(rng.choice(ids, limit, replace=False))


def encode_latents(vae: Any, tiles: np.ndarray, device: Any) -> np.ndarray:
    """(n, 2C, h, w) float16: the VAE's latent mean then std of uint8 RGB tiles (unnormalised;
    `training_latents` samples and normalises them)."""
    import torch

    x = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], 1).half().cpu().numpy()


def training_latents(stats: Any, scaling: LatentScaling, generator: Any = None) -> Any:
    """What the transformer learns to denoise: a sample z of the cached latent distribution
    ((B, 2C, h, w): mean then std), normalised as `sampling.decode_latents` undoes it."""
    import torch

    channels = stats.shape[1] // 2
    mean, std = stats[:, :channels], stats[:, channels:]
    return scaling.normalise(mean + std * torch.randn(mean.shape, generator=generator))


def _batch(data: TrainingSet, rows: np.ndarray) -> tuple[Any, Any]:
    import torch

    lat = np.stack([data.latents[s][r] for s, r in data.index[rows]]).astype(np.float32)
    tok = np.stack([data.tokens[s][r] for s, r in data.index[rows]]).astype(np.float32)
    return torch.from_numpy(lat), torch.from_numpy(tok)


def load_base(options: PixCellLoraOptions) -> tuple[ModelCard, PixCellParts, Any]:
    """The base model's card and networks on the training device (the VAE there too, to
    encode the training tiles)."""
    import torch

    from stainctl.engines.pixcell.engine import load_parts
    from stainctl.models.encoders import resolve_device
    from stainctl.models.registry import get_card

    base = get_card(options.base, options.models_dir)
    if base.engine != "pixcell":
        raise ModelError(f"--base {base.name} is a {base.engine} model; --engine pixcell adapts "
                         "a pixcell model (pixcell-1024)")
    if options.flow and not any(w.role == "flow_mlp"
                                for w in get_card(options.flow, options.models_dir).weights):
        raise ModelError(f"--flow {options.flow} has no flow MLP (a card with `flow_mlp` "
                         "weights, e.g. pixcell-mist-pr)")
    device = torch.device(resolve_device(options.device))
    parts = load_parts(base, options.models_dir, str(device))
    parts.vae.eval().requires_grad_(False).to(device)
    options.out.mkdir(parents=True, exist_ok=True)
    return base, parts, device


def train_pixcell_lora(base: ModelCard, parts: PixCellParts, data: TrainingSet,
                       options: PixCellLoraOptions, device: Any, progress: Any,
                       echo: Any = None) -> PixCellLoraResult:
    import torch

    from stainctl.engines.pixcell.sampling import make_scheduler
    from stainctl.engines.precision import autocast
    from stainctl.models.lora import adapter_state, attach, save_adapter

    parts.vae.to("cpu")  # latents are cached: free the device for the transformer
    alphas = make_scheduler(parts.config.scheduler).alphas_cumprod.to(device)
    spec = LoraSpec(rank=options.rank, alpha=options.alpha, targets=CROSS_ATTENTION_TARGETS)
    torch.manual_seed(options.seed)  # the adapters' initial values
    model = attach(parts.transformer, spec).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimiser = torch.optim.AdamW(params, lr=options.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / max(1, options.warmup)))
    run = options.out / "lora-run"
    checkpoint = run / "checkpoint.pt"
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == options.fingerprint():
            from stainctl.models.lora import _peft

            _peft().set_peft_model_state_dict(model, state["adapter"])
            optimiser.load_state_dict(state["optimiser"])
            schedule.load_state_dict(state["schedule"])
            history, start = json.loads(state["history"]), int(state["epoch"])
            if echo:
                echo(f"resuming after epoch {start}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    uncond = parts.transformer.uncond_embedding.detach().float().to(device)
    channels = parts.config.latent_channels
    scaling = parts.config.latents
    step = int(schedule.last_epoch)
    per_epoch = -(-len(data) // options.batch_size)
    progress.start("train-lora", (options.epochs - start) * per_epoch)
    for epoch in range(start, options.epochs):
        gen = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        order = torch.randperm(len(data), generator=gen).numpy()
        losses = []
        for i in range(per_epoch):
            rows = order[i * options.batch_size:(i + 1) * options.batch_size]
            stats, tokens = _batch(data, rows)
            b = len(rows)
            x0 = training_latents(stats, scaling, gen)
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, alphas.numel(), (b,), generator=gen)
            drop = torch.rand((b, 1, 1), generator=gen) < options.uncond_prob
            x0, eps, t, tokens, drop = (v.to(device) for v in (x0, eps, t, tokens, drop))
            tokens = torch.where(drop, uncond.expand_as(tokens), tokens)
            ab = alphas[t].view(b, 1, 1, 1).float()
            noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            with autocast(device, dtype):
                pred = model(noisy, encoder_hidden_states=tokens, timestep=t,
                             return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred[:, :channels].float(), eps)
            (loss / options.accumulate).backward()
            losses.append(float(loss.detach()))
            if (i + 1) % options.accumulate == 0 or i + 1 == per_epoch:
                torch.nn.utils.clip_grad_norm_(params, options.clip)
                optimiser.step()
                schedule.step()
                optimiser.zero_grad(set_to_none=True)
                step += 1
            progress.advance(1)
        history.append({"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses))})
        if echo:
            echo(f"epoch {epoch + 1}/{options.epochs}: loss {history[-1]['loss']:.4f}")
        state = {"adapter": {k: v.detach().cpu() for k, v in adapter_state(model).items()},
                 "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                 "epoch": epoch + 1, "history": json.dumps(history),
                 "fingerprint": options.fingerprint()}
        run.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)
    adapter = options.out / ADAPTER
    save_adapter(model, adapter, spec)
    flow_file = None
    if options.train_flow is not None:
        from stainctl.engines.pixcell.flow_train import train_flow

        flow_file, flow_history = train_flow(parts.encoder, parts.config.flow,
                                             parts.config.image_size, options.train_flow,
                                             device, options.out, echo)
        (options.out / "flow-history.json").write_text(json.dumps(flow_history))
    (options.out / "history.json").write_text(json.dumps(history))
    curve = loss_curve(history, options.out / "loss.png", keys=("loss",), x="epoch")
    card = write_card(_card(options, base, len(data), flow_file), options.out / "card.toml")
    return PixCellLoraResult(card, adapter, options.epochs, step, len(data), trainable, frozen,
                             history[-1]["loss"] if history else float("nan"), curve)


def _card(options: PixCellLoraOptions, base: ModelCard, tiles: int,
          flow_file: Path | None = None) -> ModelCard:
    how = (f"LoRA (rank {options.rank}, alpha {options.alpha}) on the cross-attention of "
           f"{base.name}, {options.epochs} epochs over {tiles} unpaired IHC tiles "
           f"(at most {options.max_tiles_per_slide} a slide), seed {options.seed}")
    if flow_file is not None and options.train_flow is not None:
        how += (f"; flow MLP trained {options.train_flow.epochs} epochs on the pairs of "
                f"{options.train_flow.he_dir.name}/ and {options.train_flow.ihc_dir.name}/")
    architecture: dict[str, object] = {"base": base.name, "rank": options.rank,
                                       "alpha": options.alpha}
    if options.flow:
        architecture["flow_from"] = options.flow
    weights = [WeightFile(role="adapter", path=ADAPTER)]
    if flow_file is not None:
        weights.append(WeightFile(role="flow_mlp", path=flow_file.name))
    return ModelCard(
        name=options.name, kind="marker", engine="pixcell", marker=options.marker,
        encoder=base.encoder, input_mpp=float(base.input_mpp), tile_size=int(base.tile_size),
        licence=f"as the base model {base.name} and the training slides",
        intended_use=(f"Research only; adapted from {base.name}, not validated. A generated "
                      "stain is not a measured one."),
        training_data=how, architecture=architecture, weights=tuple(weights))
