"""`train-lora --engine pixcell`: a stain LoRA on PixCell from unpaired IHC tiles (CK7 study).

The IHC slides are tiled and filtered into a workspace (or one is given ready); each kept tile is
embedded with the base model's encoder (the `embed` step, resumable) and encoded once by the VAE
(latent mean and std, cached per slide beside the run). Training is the ordinary noise-prediction
loss on those latents, conditioned on each tile's own tokens, with 10 % of the conditions swapped
for the stored unconditional embedding (for guidance at inference); only a peft LoRA on the
cross-attention projections trains. AdamW, constant learning rate after a linear warm-up,
gradient clipping, gradient accumulation, bf16 autocast on a GPU. Every epoch's randomness comes
from a generator seeded by (seed, epoch), and a checkpoint is written after each epoch, so a
killed run resumes from the last epoch and ends as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.pixcell.flow_train import FlowTrainOptions
from stainctl.errors import ModelError, UsageError
from stainctl.models.adapted import ADAPTER, loss_curve, toml_string, write_card
from stainctl.models.lora import CROSS_ATTENTION_TARGETS, LoraSpec
from stainctl.workspace import Workspace, atomic_path

log = logging.getLogger(__name__)


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

    def validate(self) -> None:
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
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("epochs", "out", "models_dir", "device", "name", "flow",
                             "train_flow")}
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


def _select(ids: np.ndarray, limit: int, seed: int, key: str) -> np.ndarray:
    if len(ids) <= limit:
        return np.sort(ids)
    from stainctl.engines.base import stable_seed

    rng = np.random.default_rng(stable_seed(seed, key))
    return np.sort(rng.choice(ids, limit, replace=False))


def prepare(ws: Workspace, parts: Any, options: PixCellLoraOptions, mpp: float, device: Any,
            progress: Any) -> TrainingSet:
    """Tokens (from the embed step) and cached VAE latents of up to max-tiles-per-slide kept
    tiles of every filtered slide."""
    import torch

    from stainctl.slide.tiles import TileSource, read_batches
    from stainctl.steps.embed import EmbedOptions, embed_slides

    encoder = parts.encoder.name
    embedded = embed_slides(ws, EmbedOptions(encoder=encoder, models_dir=options.models_dir,
                                             device=str(device)), progress)
    for o in embedded.failed:
        log.warning("%s: not used (%s)", o.slide, o.message)
    cache = options.out / "lora-run" / "latents"
    cache.mkdir(parents=True, exist_ok=True)
    latents: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    index: list[tuple[int, int]] = []
    for s in ws.manifest.slides_done(f"embed:{encoder}"):
        base = ws.slide_dir(s["key"]) / "embeddings"
        ids_all = np.load(base / f"{encoder}.tiles.npy")
        chosen = _select(ids_all, options.max_tiles_per_slide, options.seed, s["key"])
        rows = np.searchsorted(ids_all, chosen)
        tok = np.load(base / f"{encoder}.npy", mmap_mode="r")[rows]
        grid = ws.manifest.grid(s["id"])
        assert grid is not None  # filtered slides have a grid
        if (int(grid["tile_size"]) != parts.config.image_size
                or abs(float(grid["target_mpp"]) / mpp - 1) > 0.1):
            raise UsageError(f"{ws.root}: {s['key']} is tiled at {grid['tile_size']} px, "
                             f"{grid['target_mpp']} µm/px; {options.base} trains on "
                             f"{parts.config.image_size}-px tiles at {mpp} µm/px: re-tile with "
                             f"--tile-size {parts.config.image_size} --target-mpp {mpp}")
        path = cache / f"{s['key']}.{hashlib.sha256(chosen.tobytes()).hexdigest()[:12]}.npy"
        if not path.exists():
            xy = {int(i): (int(x), int(y)) for i, x, y in ws.manifest.db.execute(
                "SELECT id, x, y FROM tiles WHERE slide_id=?", (s["id"],)).fetchall()}
            coords = np.array([xy[int(i)] for i in chosen], np.int64).reshape(-1, 2)
            source = TileSource(s["path"], float(grid["extent0"]), int(grid["tile_size"]))
            parts_out = []
            for batch in read_batches(source, coords, options.batch_size, 2):
                x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
                with torch.no_grad():
                    dist = parts.vae.encode(x).latent_dist
                parts_out.append(torch.cat([dist.mean, dist.std], 1).half().cpu().numpy())
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(parts_out))
        latents.append(np.load(path, mmap_mode="r"))
        tokens.append(np.asarray(tok))
        index.extend((len(latents) - 1, r) for r in range(len(chosen)))
    if not index:
        raise UsageError(f"no kept IHC tiles to train on in {ws.root}: tile and filter IHC "
                         "slides into it first (or give them with --ihc)")
    return TrainingSet(latents, tokens, np.asarray(index, np.int64))


def _batch(data: TrainingSet, rows: np.ndarray) -> tuple[Any, Any]:
    import torch

    lat = np.stack([data.latents[s][r] for s, r in data.index[rows]]).astype(np.float32)
    tok = np.stack([data.tokens[s][r] for s, r in data.index[rows]]).astype(np.float32)
    return torch.from_numpy(lat), torch.from_numpy(tok)


def train_pixcell_lora(ws: Workspace, options: PixCellLoraOptions, progress: Any,
                       echo: Any = None) -> PixCellLoraResult:
    import torch

    from stainctl.engines.pixcell.engine import load_parts
    from stainctl.engines.pixcell.sampling import autocast
    from stainctl.models.encoders import resolve_device
    from stainctl.models.lora import adapter_state, attach, save_adapter
    from stainctl.models.registry import get_card

    options.validate()
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
    data = prepare(ws, parts, options, float(base.input_mpp), device, progress)
    parts.vae.to("cpu")  # latents are cached: free the device for the transformer

    from stainctl.engines.pixcell.sampling import make_scheduler

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
            mean, std = stats[:, :channels], stats[:, channels:]
            x0 = mean + std * torch.randn(mean.shape, generator=gen)
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
    card = write_card(options.out / "card.toml", _card_lines(options, base, len(data), flow_file))
    return PixCellLoraResult(card, adapter, options.epochs, step, len(data), trainable, frozen,
                             history[-1]["loss"] if history else float("nan"), curve)


def _card_lines(options: PixCellLoraOptions, base: Any, tiles: int,
                flow_file: Path | None = None) -> list[str]:
    q = toml_string
    how = (f"LoRA (rank {options.rank}, alpha {options.alpha}) on the cross-attention of "
           f"{base.name}, {options.epochs} epochs over {tiles} unpaired IHC tiles "
           f"(at most {options.max_tiles_per_slide} a slide), seed {options.seed}")
    if flow_file is not None and options.train_flow is not None:
        how += (f"; flow MLP trained {options.train_flow.epochs} epochs on the pairs of "
                f"{options.train_flow.he_dir.name}/ and {options.train_flow.ihc_dir.name}/")
    use = (f"Research only; adapted from {base.name}, not validated. A generated stain is not "
           "a measured one.")
    lines = [
        f"name = {q(options.name)}", 'kind = "marker"', 'engine = "pixcell"',
        f"marker = {q(options.marker)}", f"encoder = {q(base.encoder)}",
        f"input_mpp = {float(base.input_mpp)}", f"tile_size = {int(base.tile_size)}",
        f"licence = {q('as the base model ' + base.name + ' and the training slides')}",
        f"intended_use = {q(use)}",
        f"training_data = {q(how)}",
        "",
        "[architecture]",
        f"base = {q(base.name)}",
        f"rank = {options.rank}",
        f"alpha = {options.alpha}",
    ]
    if options.flow:
        lines.append(f"flow_from = {q(options.flow)}")
    lines += ["", "[[weights]]", 'role = "adapter"', f"path = {q(ADAPTER)}", ""]
    if flow_file is not None:
        lines += ["[[weights]]", 'role = "flow_mlp"', f"path = {q(flow_file.name)}", ""]
    return lines
