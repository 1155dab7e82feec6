"""The trained part of an align model: projection heads over an encoder's tile embeddings, the
patch head that gives each tile its IHC pattern class, and the slide-level pooling.

A tile's embedding is the mean of its encoder tokens. Both projections are two-layer MLPs onto a
unit sphere; the patch head and the attention pooling (gated attention, Ilse et al. 2018) read
the H&E projection, so `predict` needs only H&E tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stainctl.errors import ModelError

POOLS = ("mean", "max", "attention")


@dataclass(frozen=True, kw_only=True)
class HeadsConfig:
    dim: int  # the encoder's token dimension
    classes: tuple[str, ...]
    hidden: int = 256
    proj: int = 128
    pool: str = "mean"
    temperature: float = 0.1  # InfoNCE's, fixed

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ModelError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if len(self.classes) < 2 or len(set(self.classes)) < len(self.classes):
            raise ModelError(f"an align model needs at least two distinct classes, got "
                             f"{list(self.classes)}")
        if min(self.dim, self.hidden, self.proj) < 1 or self.temperature <= 0:
            raise ModelError("dim, hidden and proj must be positive, temperature above 0")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadsConfig:
        try:
            return cls(dim=int(d["dim"]), classes=tuple(str(c) for c in d["classes"]),
                       hidden=int(d.get("hidden", 256)), proj=int(d.get("proj", 128)),
                       pool=str(d.get("pool", "mean")),
                       temperature=float(d.get("temperature", 0.1)))
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"align model architecture: missing or bad {err}") from None


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class AlignHeads(nn.Module):
    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.he = _mlp(c.dim, c.hidden, c.proj)
        self.ihc = _mlp(c.dim, c.hidden, c.proj)
        self.patch = nn.Linear(c.proj, len(c.classes))
        # Gated attention over a slide's tiles (used when pool = attention).
        self.att_v = nn.Linear(c.proj, c.hidden // 2)
        self.att_u = nn.Linear(c.proj, c.hidden // 2)
        self.att_w = nn.Linear(c.hidden // 2, 1)

    @staticmethod
    def tile_embedding(tokens: torch.Tensor) -> torch.Tensor:
        """(N, tokens, dim) -> (N, dim): the mean token."""
        return tokens.float().mean(dim=1)

    def project_he(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.he(x), dim=-1)

    def project_ihc(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ihc(x), dim=-1)

    def tile_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.patch(z)

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """(N, proj) -> (N,) weights summing to one."""
        a = self.att_w(torch.tanh(self.att_v(z)) * torch.sigmoid(self.att_u(z))).squeeze(-1)
        return torch.softmax(a, dim=0)

    def slide_probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """(N, proj) H&E projections of one slide's tiles -> (classes,) probabilities."""
        if self.config.pool == "attention":
            return torch.softmax(self.patch(self.attention(z) @ z), dim=-1)
        probs = torch.softmax(self.patch(z), dim=-1)
        if self.config.pool == "max":
            peak = probs.max(dim=0).values  # each class's strongest tile
            return peak / peak.sum()
        return probs.mean(dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) of unit rows: row i of `a` and of `b` are a pair."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def save_heads(heads: AlignHeads, path: Path) -> Path:
    from safetensors.torch import save_file

    from stainctl.workspace.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp))
    return path


def load_heads(config: HeadsConfig, path: Path) -> AlignHeads:
    from stainctl.models.weights import load_state_dict

    heads = AlignHeads(config)
    try:
        heads.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path} does not fit the align model's architecture "
                         f"({str(err).splitlines()[0]})") from None
    return heads.eval()


def tile_probabilities(heads: AlignHeads, tokens: np.ndarray, batch: int = 4096
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(N, tokens, dim) float16 tokens -> ((N, classes) probabilities, (N, proj) projections)."""
    probs, zs = [], []
    with torch.inference_mode():
        for s in range(0, len(tokens), batch):
            x = heads.tile_embedding(torch.from_numpy(np.array(tokens[s:s + batch])))
            z = heads.project_he(x)
            zs.append(z)
            probs.append(torch.softmax(heads.tile_logits(z), dim=-1))
    return torch.cat(probs).numpy(), torch.cat(zs).numpy()
