"""HistoStainAlign's training loop over cached tile embeddings.

Each step takes a random batch of corresponding training tiles (drawn by a generator seeded with
(seed, step), so a resumed run draws what an uninterrupted one would) and minimises
  symmetric InfoNCE(H&E projection, IHC projection)
  + cross-entropy of the patch head on the labelled tiles of the batch
  + with --pool attention, cross-entropy of each labelled slide's attention-pooled class.
A checkpoint (heads, optimiser, history) is written every `checkpoint_every` steps and at the
end; a run finding one made with the same data and settings continues from it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stainctl.align.heads import AlignHeads, HeadsConfig, info_nce
from stainctl.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AlignData:
    he: np.ndarray  # (N, dim) float32 mean tokens
    ihc: np.ndarray  # (N, dim)
    labels: np.ndarray  # (N,) class index, -1 unlabelled
    slide: np.ndarray  # (N,) index into slide_labels
    slide_labels: np.ndarray  # (S,) class index, -1 unlabelled
    train: np.ndarray  # (N,) bool: used for training (the rest validates)

    def __post_init__(self) -> None:
        n = len(self.he)
        if not (self.ihc.shape == self.he.shape and len(self.labels) == len(self.slide)
                == len(self.train) == n):
            raise ValueError("AlignData arrays must have one row per tile pair")
        if self.train.sum() < 2:
            raise UsageError(f"train-align needs at least 2 training tile pairs, found "
                             f"{int(self.train.sum())}: give more or larger pairs")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 50
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch, self.checkpoint_every) < 1 or self.lr <= 0:
            raise UsageError("--steps, --batch and --checkpoint-every must be at least 1, and "
                             "--lr above 0")


def _step(heads: AlignHeads, data: AlignData, t: dict[str, torch.Tensor],
          slide_rows: dict[int, torch.Tensor], idx: np.ndarray,
          config: LoopConfig) -> dict[str, torch.Tensor]:
    i = torch.from_numpy(idx)
    z_he = heads.project_he(t["he"][i])
    z_ihc = heads.project_ihc(t["ihc"][i])
    nce = info_nce(z_he, z_ihc, heads.config.temperature)
    labels = t["labels"][i]
    known = labels >= 0
    ce = (F.cross_entropy(heads.tile_logits(z_he[known]), labels[known]) if known.any()
          else torch.zeros(()))
    slide = torch.zeros(())
    if heads.config.pool == "attention":
        terms = []
        for s, label in enumerate(data.slide_labels):
            rows = slide_rows[s]
            if label >= 0 and len(rows):
                p = heads.slide_probabilities(heads.project_he(t["he"][rows]))
                terms.append(-torch.log(p[int(label)].clamp_min(1e-8)))
        if terms:
            slide = torch.stack(terms).mean()
    loss = nce + config.ce_weight * ce + slide
    return {"loss": loss, "infonce": nce, "ce": ce, "slide": slide}


def train_heads(data: AlignData, heads_config: HeadsConfig, config: LoopConfig, run: Path,
                key: str, on_step: Callable[[int], None] | None = None
                ) -> tuple[AlignHeads, list[dict[str, float]]]:
    """Train (or resume) in `run/`; `key` names the data and settings a checkpoint must share.
    `on_step(step)` is called after each step (progress, and a safe point for signals)."""
    from stainctl.workspace.atomic import atomic_path

    torch.manual_seed(config.seed)
    heads = AlignHeads(heads_config)
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict[str, float]] = []
    ckpt = run / "checkpoint.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            heads.load_state_dict(saved["heads"])
            opt.load_state_dict(saved["optimizer"])
            history = json.loads(saved["history"])
            log.info("train-align: resuming at step %d of %d", len(history), config.steps)
        else:
            log.info("train-align: %s was made with other data or settings; starting again",
                     ckpt)
    t = {"he": torch.from_numpy(data.he), "ihc": torch.from_numpy(data.ihc),
         "labels": torch.from_numpy(data.labels)}
    train_idx = np.flatnonzero(data.train)
    slide_rows = {s: torch.from_numpy(np.flatnonzero(data.train & (data.slide == s)))
                  for s in range(len(data.slide_labels))}

    def save() -> None:
        run.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt) as tmp:
            torch.save({"heads": heads.state_dict(), "optimizer": opt.state_dict(),
                        "history": json.dumps(history), "key": key}, tmp)

    heads.train()
    # The heads' matrices are small (a batch of tiles x a few hundred): one thread is ~15x
    # faster than two that wait on each other (measured on the 2-core build machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _loop(heads, opt, data, t, slide_rows, train_idx, config, history, save, on_step)
    finally:
        torch.set_num_threads(threads)
    return heads.eval(), history


def _loop(heads: AlignHeads, opt: torch.optim.Optimizer, data: AlignData,
          t: dict[str, torch.Tensor], slide_rows: dict[int, torch.Tensor],
          train_idx: np.ndarray, config: LoopConfig, history: list[dict[str, float]],
          save: Callable[[], None], on_step: Callable[[int], None] | None) -> None:
    while len(history) < config.steps:
        step = len(history)
        rng = np.random.default_rng([config.seed, step])
        idx = rng.choice(train_idx, size=min(config.batch, len(train_idx)), replace=False)
        opt.zero_grad()
        losses = _step(heads, data, t, slide_rows, idx, config)
        losses["loss"].backward()
        opt.step()
        history.append({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save()
        if on_step is not None:
            on_step(step + 1)
