"""What train-align measures of the model it made (the card's [metrics] and metrics.json):
paired retrieval per pair among its training tiles (HistoStainAlign's alignment check, against
chance 1/tiles), the tile classes of the held-out tiles (weighted F1 with its bootstrap 95 %
interval, per-class recall) and each training slide's pooled class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stainctl.align.data import PairTiles
from stainctl.align.heads import AlignHeads
from stainctl.align.train import AlignData
from stainctl.evaluate.agreement import ClassAgreement


@dataclass(frozen=True, kw_only=True)
class AlignMetrics:
    retrieval_top1: float  # tile-weighted over the pairs
    retrieval_chance: float
    retrieval: list[dict[str, Any]]  # per pair
    tiles: ClassAgreement
    evaluated_on: str  # "held-out tiles", or the training tiles when none is held out
    slides: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"retrieval_top1": self.retrieval_top1, "retrieval_chance": self.retrieval_chance,
                "retrieval": self.retrieval,
                "tile_classes": {"on": self.evaluated_on, **self.tiles.as_dict()},
                "slides": self.slides}

    def card(self) -> dict[str, Any]:
        t = self.tiles
        return {"retrieval_top1_training_pairs": round(self.retrieval_top1, 4),
                "retrieval_chance": round(self.retrieval_chance, 4),
                "tile_weighted_f1": round(t.weighted_f1, 4),
                "tile_weighted_f1_ci95": [round(v, 4) for v in t.f1_ci],
                "tile_recall": {k: round(v, 4) for k, v in t.recall.items()},
                "tiles_evaluated": t.n, "evaluated_on": self.evaluated_on,
                "training_slides": [s["slide"] for s in self.slides]}


def align_metrics(heads: AlignHeads, data: AlignData, pairs: list[PairTiles],
                  values: list[np.ndarray], sources: list[str]) -> AlignMetrics:
    """Paired retrieval (per pair, among its training tiles), the tile classes of the held-out
    tiles (the training tiles when none is held out), the slide classes."""
    import torch

    from stainctl.evaluate.agreement import class_agreement
    from stainctl.evaluate.retrieval import mra

    names = heads.config.classes
    with torch.inference_mode():
        z_he = heads.project_he(torch.from_numpy(data.he))
        z_ihc = heads.project_ihc(torch.from_numpy(data.ihc))
        pred = heads.tile_logits(z_he).argmax(dim=1).numpy()
        retrieval: list[dict[str, Any]] = []
        slides: list[dict[str, Any]] = []
        top1, chance, counts = [], [], []
        for s, p in enumerate(pairs):
            rows = np.flatnonzero((data.slide == s) & data.train)
            r = torch.from_numpy(rows)
            # The MRA metric: each H&E tile's own IHC tile among the pair's.
            m = mra(z_ihc[r].numpy(), z_he[r].numpy())
            top1.append(m["top1"])
            chance.append(m["chance_top1"])
            counts.append(len(rows))
            retrieval.append({"slide": p.name, "tiles": len(rows), "top1": top1[-1],
                              "chance": chance[-1]})
            probs = heads.slide_probabilities(z_he[torch.from_numpy(
                np.flatnonzero(data.slide == s))]).numpy()
            slides.append({"slide": p.name, "predicted": names[int(probs.argmax())],
                           "probability": float(probs.max()),
                           "label": names[int(data.slide_labels[s])]
                           if data.slide_labels[s] >= 0 else "",
                           "label_from": sources[s],
                           "registration": p.registration,
                           "mean_measure": float(np.nanmean(values[s]))
                           if np.isfinite(values[s]).any() else float("nan")})
    held = ~data.train & (data.labels >= 0)
    split = "held-out tiles"
    if not held.any():
        held, split = data.train & (data.labels >= 0), "training tiles (none held out)"
    tiles = class_agreement([names[i] for i in data.labels[held]],
                            [names[i] for i in pred[held]], names)
    return AlignMetrics(
        retrieval_top1=float(np.average(top1, weights=counts)),
        retrieval_chance=float(np.average(chance, weights=counts)),
        retrieval=retrieval, tiles=tiles, evaluated_on=split, slides=slides)
