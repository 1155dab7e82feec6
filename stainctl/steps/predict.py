"""`predict`: an align model's IHC pattern class per tile and per slide, from the H&E tokens of
the `embed` step (run first, with the model's encoder; resumable).

Per slide: `<slide>.<model>.geojson` (tile polygons in level-0 px with their class
probabilities), `<slide>.<model>.heatmap.png` (each tile's score, 0-1: the probability of the
last class, or with more than two classes the expected class index over the number of classes
less one) in OUT (default WS/outputs), and a row in `OUT/predict.<model>.csv` (rows of other
slides already there are kept). The files take the form of `readout`'s (the same writers), so
the virtual-IHC readout and the direct prediction can be put side by side. Predictions are
recomputed on every run: from stored tokens they take milliseconds per slide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stainctl.errors import ModelError, SlideError, UsageError
from stainctl.steps.lifecycle import SlidePlan, SlideStep
from stainctl.steps.report import BatchResult, Progress, SilentProgress, SlideOutcome
from stainctl.workspace import SlideRecord, StepRecord, Workspace

if TYPE_CHECKING:
    from stainctl.align.heads import AlignHeads
    from stainctl.models.card import ModelCard

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    model: str
    out: Path | None = None  # default WS/outputs
    models_dir: Path | None = None
    device: str = "auto"  # the encoder's, for slides not embedded yet
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.model:
            raise UsageError("stainctl predict needs --model (an align model from "
                             "`stainctl train-align`)")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")


def csv_path(folder: Path, model: str) -> Path:
    return folder / f"predict.{model}.csv"


def predict_slides(ws: Workspace, options: PredictOptions,
                   progress: Progress | None = None) -> BatchResult:
    from stainctl.align.heads import HeadsConfig, load_heads
    from stainctl.models.registry import all_cards, get_card, models_dir, required_cards
    from stainctl.models.weights import check_installed, resolve
    from stainctl.readout.outputs import write_table
    from stainctl.steps.embed import EmbedOptions, embed_slides

    progress = progress or SilentProgress()
    directory = models_dir(options.models_dir)
    card = get_card(options.model, directory)
    if card.kind != "classifier":
        known = sorted(n for n, c in all_cards(directory).items() if c.kind == "classifier")
        raise ModelError(f"{card.name} is a {card.kind} model; --model needs an align model "
                         f"(made by `stainctl train-align`; installed: "
                         f"{', '.join(known) or 'none'})")
    check_installed(required_cards(card, directory), directory)
    weights = resolve(card, "heads", directory)
    heads = load_heads(HeadsConfig.from_dict(card.architecture), weights)
    embedded = embed_slides(ws, EmbedOptions(encoder=card.encoder, models_dir=directory,
                                             device=options.device,
                                             batch_size=options.batch_size), progress)
    folder = options.out or ws.root / "outputs"
    step = PredictStep(ws, progress, card, heads, weights, folder)
    result = step.run(ws.manifest.slides_done(Workspace.embed_step(card.encoder)))
    result.slides[:0] = embedded.failed  # not embedded: no prediction either
    rows = {s.slide: s.details for s in result.slides if s.state == "done"}
    if rows:
        columns = ["slide", "path", "model", "class", "probability",
                   *[f"p_{c}" for c in heads.config.classes], "tiles", "mean_tile_score"]
        write_table(csv_path(folder, card.name), rows, columns)
    return result


class PredictStep(SlideStep[SlideRecord, Path]):
    label = "predict"

    def __init__(self, ws: Workspace, progress: Progress, card: ModelCard, heads: AlignHeads,
                 weights: Path, folder: Path) -> None:
        from stainctl.models.weights import sha256_of

        super().__init__(ws, progress, force=True)  # recomputed each run (see the docstring)
        self.card, self.heads, self.folder = card, heads, folder
        self.weights_hash = sha256_of(weights)[:16]

    def slide(self, item: SlideRecord) -> SlideRecord:
        return item

    def step_name(self, item: SlideRecord) -> str:
        return Workspace.predict_step(self.card.name)

    def where(self, item: SlideRecord) -> Path:
        return self.folder

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, Path]:
        self.model_grid(slide, self.card)
        embedded = self.manifest.step(slide.id, Workspace.embed_step(self.card.encoder))
        params = {"model": self.card.name, "heads": self.weights_hash,
                  "embeddings": embedded.params_hash if embedded else None}
        return SlidePlan(item=item, slide=slide, step=self.step_name(item), params=params,
                         work=self.folder, previous=previous)

    def skipped(self, plan: SlidePlan[SlideRecord, Path]) -> SlideOutcome:
        raise AssertionError("predict recomputes every slide")

    def run_one(self, plan: SlidePlan[SlideRecord, Path]) -> SlideOutcome:
        import torch

        from stainctl.align.heads import tile_probabilities
        from stainctl.readout.outputs import (
            grid_png,
            tile_feature,
            tile_grid,
            write_feature_collection,
        )
        from stainctl.workspace.atomic import atomic_bytes

        slide, card, classes = plan.slide, self.card, self.heads.config.classes
        files = self.ws.embedding_files(slide.key, card.encoder)
        try:
            ids = np.load(files.ids)
            tokens = np.load(files.tokens, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise SlideError(slide.path, f"its {card.encoder} embeddings cannot be read "
                             f"({err}); run `stainctl embed -w WS --encoder {card.encoder} "
                             "--force`") from None
        grid = self.manifest.grid(slide.id)
        assert grid is not None  # embedded slides have a grid
        xy0 = np.asarray(self.manifest.tile_positions(slide.id, ids), np.int64).reshape(-1, 2)
        probs, z = tile_probabilities(self.heads, tokens)
        with torch.inference_mode():
            slide_p = self.heads.slide_probabilities(torch.from_numpy(z)).numpy()
        k = len(classes)
        score = probs @ np.arange(k) / (k - 1)  # P(last class) with two classes
        best = int(slide_p.argmax())
        size0 = (float(slide.width or xy0[:, 0].max() + grid.extent0),
                 float(slide.height or xy0[:, 1].max() + grid.extent0))
        features = (tile_feature(int(x), int(y), grid.extent0, size0,
                                 {**{f"p_{c}": round(float(p[j]), 6)
                                     for j, c in enumerate(classes)},
                                  "score": round(float(s), 6)}, classes[int(p.argmax())])
                    for (x, y), p, s in zip(xy0, probs, score, strict=True))
        base = self.folder / f"{slide.key}.{card.name}"
        geojson = base.with_name(base.name + ".geojson")
        heatmap = base.with_name(base.name + ".heatmap.png")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_feature_collection(geojson, features, {
            "slide": slide.key, "model": card.name, "coordinates": "level-0 pixels"})
        atomic_bytes(heatmap, grid_png(tile_grid(xy0, score, grid.stride0, size0)))
        details: dict[str, object] = {
            "slide": slide.key, "path": slide.path, "model": card.name,
            "class": classes[best], "probability": float(slide_p[best]),
            **{f"p_{c}": float(slide_p[j]) for j, c in enumerate(classes)},
            "tiles": len(ids), "mean_tile_score": float(score.mean()),
            "geojson": str(geojson), "heatmap": str(heatmap)}
        return SlideOutcome(slide.key, slide.path, "done",
                            f"{classes[best]} ({slide_p[best]:.2f}) from {len(ids)} tiles",
                            details)
