"""`train-lora --engine pixcell --train-flow`: a new flow MLP from paired H&E / IHC tiles.

Pairs are images of the same tissue with the same file stem in two folders (as MIST and
HER2Match distribute them: 1024-px tiles at 0.5 µm/px). Both are embedded with the base model's
encoder; the flow learns the straight path between the two token sets (rectified flow: at a
random time t in [0, 1], the point t x IHC + (1 - t) x H&E should move by IHC - H&E), token by
token, with the time scaled to 0..999 as the released flows are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
FLOW_FILE = "flow_mlp.safetensors"


@dataclass(frozen=True)
class FlowTrainOptions:
    he_dir: Path
    ihc_dir: Path
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 4  # tile pairs a step (x tokens a tile)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--flow-epochs and --batch-size must be at least 1")


def paired_images(he_dir: Path, ihc_dir: Path) -> list[tuple[Path, Path]]:
    def images(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder of paired tiles")
        return {p.stem: p for p in sorted(folder.iterdir())
                if p.suffix.lower() in IMAGE_SUFFIXES}

    he, ihc = images(he_dir), images(ihc_dir)
    common = sorted(he.keys() & ihc.keys())
    if not common:
        raise UsageError(f"no pairs: no image in {he_dir} has a namesake in {ihc_dir} "
                         "(pairs share their file name, e.g. he/0001.png and ihc/0001.png)")
    return [(he[k], ihc[k]) for k in common]


def _read(path: Path, side: int) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UsageError(f"{path} is not a readable image")
    if img.shape[:2] != (side, side):
        raise UsageError(f"{path} is {img.shape[1]} x {img.shape[0]} px; paired tiles must be "
                         f"{side} x {side} px at the base model's µm/px")
    return np.ascontiguousarray(img[..., ::-1])


def train_flow(encoder: Any, flow_config: dict[str, Any], side: int, options: FlowTrainOptions,
               device: Any, out: Path, echo: Any = None) -> tuple[Path, list[dict[str, float]]]:
    """Train a flow MLP on the pairs; save it as safetensors in `out`; return it and the
    per-epoch losses."""
    import torch
    from safetensors.torch import save_file

    from stainctl.engines.pixcell.flow import FlowMLP
    from stainctl.workspace.atomic import atomic_path

    pairs = paired_images(options.he_dir, options.ihc_dir)
    he, ihc = [], []
    for a, b in pairs:
        tokens = encoder.encode(np.stack([_read(a, side), _read(b, side)])).float()
        he.append(tokens[0])
        ihc.append(tokens[1])
    src = torch.cat(he).to(device)  # (pairs x tokens, D): the flow works token by token
    dst = torch.cat(ihc).to(device)
    torch.manual_seed(options.seed)
    flow = FlowMLP(**flow_config).to(device).train()
    optimiser = torch.optim.AdamW(flow.parameters(), lr=options.lr)
    per_step = options.batch_size * (len(src) // len(pairs))
    history = []
    for epoch in range(options.epochs):
        gen = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        order = torch.randperm(len(src), generator=gen).to(device)
        losses = []
        for i in range(0, len(src), per_step):
            rows = order[i:i + per_step]
            t = torch.rand((len(rows), 1), generator=gen).to(device)
            x = t * dst[rows] + (1 - t) * src[rows]
            loss = torch.nn.functional.mse_loss(flow(x, 999 * t[:, 0]), dst[rows] - src[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        if echo and ((epoch + 1) % max(1, options.epochs // 10) == 0):
            echo(f"flow epoch {epoch + 1}/{options.epochs}: loss {history[-1]['loss']:.4f}")
    path = out / FLOW_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"pairs": str(len(pairs)),
                                             "history": json.dumps(history)})
    return path, history
