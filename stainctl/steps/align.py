"""`train-align` as a step: pairs registered and tiled, both sides embedded by an encoder card,
labels from the IHC tiles' readout or a CSV, the heads trained, evaluated, and the model folder
(card with its metrics, heads, history, loss curve) written and installed for `predict`."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import UsageError
from stainctl.models.card import NAME_RULE, valid_name
from stainctl.steps.report import Progress, SilentProgress

if TYPE_CHECKING:
    from stainctl.align.data import ClassBins, PairTiles
    from stainctl.align.metrics import AlignMetrics
    from stainctl.models.encoders import TileEncoder

log = logging.getLogger(__name__)
HEADS = "heads.safetensors"


@dataclass(frozen=True, kw_only=True)
class AlignOptions:
    marker: str  # the IHC stain of the pairs (ki67, pancytokeratin, ...)
    pairs: tuple[tuple[Path, Path], ...]  # (H&E, IHC) serial sections
    encoder: str = "uni2-h"
    classes: ClassBins | None = None
    measure: str = ""  # what a tile's IHC readout is binned on; default by the marker
    labels: Path | None = None  # CSV of slide and tile labels
    pool: str = "mean"
    name: str = ""  # default <marker>-align
    out: Path | None = None
    models_dir: Path | None = None
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    val: float = 0.2  # fraction of each pair's tiles kept out of training, for the metrics
    checkpoint_every: int = 50
    default_mpp: float | None = None  # for images without a pixel size (JPEG, PNG)
    device: str = "auto"
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        from stainctl.align.data import MEASURES
        from stainctl.align.heads import POOLS

        if not self.marker or not self.pairs:
            raise UsageError("stainctl train-align needs --marker and at least one --pair HE,IHC")
        if not valid_name(self.model_name):
            raise UsageError(f"--name {self.model_name!r}: {NAME_RULE}")
        if self.pool not in POOLS:
            raise UsageError(f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.measure and self.measure not in MEASURES:
            raise UsageError(f"--measure must be one of {', '.join(MEASURES)}, got "
                             f"{self.measure!r}")
        if self.classes is None and self.labels is None:
            raise UsageError("train-align needs labels: --classes with thresholds (e.g. "
                             "'low<20<high', binning each IHC tile's readout) or --labels CSV")
        if (self.classes is not None and not self.classes.thresholds
                and self.labels is None):
            raise UsageError(f"--classes {self.classes.text()!r} has no thresholds: give them "
                             "('low<20<high') or the labels with --labels CSV")
        if not 0 <= self.val < 1:
            raise UsageError(f"--val must be in [0, 1), got {self.val}")
        names = [he.name.split(".")[0] for he, _ in self.pairs]
        if len(set(names)) < len(names):
            raise UsageError("--pair: two H&E images share a name; labels and the card name "
                             "slides by it")
        for he, ihc in self.pairs:
            for p in (he, ihc):
                if not Path(p).exists():
                    raise UsageError(f"--pair: {p} does not exist")

    @property
    def model_name(self) -> str:
        return self.name or f"{self.marker.lower()}-align"

    @property
    def readout_measure(self) -> str:
        from stainctl.align.data import default_measure

        return self.measure or default_measure(self.marker)

    @property
    def uses_measure(self) -> bool:
        return self.classes is not None and bool(self.classes.thresholds)


@dataclass(frozen=True, kw_only=True)
class AlignResult:
    name: str
    card: Path
    folder: Path
    tiles: int
    steps: int
    history: list[dict[str, float]]
    metrics: AlignMetrics


def _file_key(p: Path) -> str:
    st = Path(p).stat()
    return f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _embed(encoder: TileEncoder, tiles: NDArray[np.uint8],
           batch: int = 16) -> NDArray[np.float32]:
    """(N, dim) float32: the mean of the float16 tokens the embed step would store."""
    out = [encoder.encode(tiles[s:s + batch], half=True).float().mean(dim=1).numpy()
           for s in range(0, len(tiles), batch)]
    return np.concatenate(out).astype(np.float32)


def _split(n: int, val: float, seed: int, name: str) -> NDArray[np.bool_]:
    """(n,) bool, True for training: about `val` of the tiles held out, seeded per slide."""
    train = np.ones(n, bool)
    k = round(val * n)
    if val > 0 and n >= 3:
        digest = hashlib.sha256(name.encode()).digest()[:4]
        rng = np.random.default_rng([seed, int.from_bytes(digest, "little")])
        train[rng.permutation(n)[:max(1, min(k, n - 2))]] = False
    return train


def train_align(options: AlignOptions, progress: Progress | None = None) -> AlignResult:
    from stainctl.align.data import ClassBins, LabelTable, pair_tiles, tile_labels
    from stainctl.align.heads import HeadsConfig, save_heads
    from stainctl.align.metrics import align_metrics
    from stainctl.align.train import AlignData, LoopConfig, train_heads
    from stainctl.interrupt import check
    from stainctl.models.adapted import loss_curve
    from stainctl.models.card import ModelCard, WeightFile, write_card
    from stainctl.models.encoders import load_encoder
    from stainctl.models.registry import SHIPPED, get_card, install, models_dir
    from stainctl.models.weights import check_installed, sha256_of
    from stainctl.workspace.atomic import atomic_path

    progress = progress or SilentProgress()
    name = options.model_name
    if (SHIPPED / f"{name}.toml").exists():
        raise UsageError(f"{name} is a model shipped with stainctl; give the new one another "
                         "--name")
    directory = models_dir(options.models_dir)
    folder = options.out or directory / name
    run = folder / "run"
    table = LabelTable.read(options.labels) if options.labels else None
    bins = options.classes or ClassBins(names=table.classes() if table else ())
    enc_card = get_card(options.encoder, directory)
    # Missing encoder weights are said now, before the pairs are registered and tiled; the
    # encoder itself is loaded only if the embeddings are not cached.
    check_installed([enc_card], directory)
    loop = LoopConfig(steps=options.steps, batch=options.batch, lr=options.lr,
                      seed=options.seed, checkpoint_every=options.checkpoint_every)
    mpp, side = float(enc_card.input_mpp), int(enc_card.tile_size)

    # Tiles and their embeddings, cached in run/ (a resumed run trains on the same numbers).
    pairs: list[PairTiles] = []
    for he, ihc in options.pairs:
        pairs.append(pair_tiles(Path(he), Path(ihc), mpp=mpp, tile=side,
                                default_mpp=options.default_mpp,
                                min_tissue=options.min_tissue))
        check()
    data_key = hashlib.sha256(json.dumps({
        "pairs": [[_file_key(a), _file_key(b)] for a, b in options.pairs],
        "encoder": enc_card.name, "weights": [w.source for w in enc_card.weights],
        "mpp": mpp, "side": side, "min_tissue": options.min_tissue}).encode()).hexdigest()[:16]
    cache = run / f"embeddings.{data_key}.npz"
    if cache.exists():
        saved = np.load(cache)
        he_emb, ihc_emb = saved["he"], saved["ihc"]
    else:  # the encoder is loaded only when there is something to embed
        encoder = load_encoder(enc_card, directory, device=options.device)
        progress.start("embed", sum(2 * len(p.he) for p in pairs))
        he_parts, ihc_parts = [], []
        for p in pairs:
            he_parts.append(_embed(encoder, p.he))
            progress.advance(len(p.he))
            ihc_parts.append(_embed(encoder, p.ihc))
            progress.advance(len(p.he))
            check()
        he_emb, ihc_emb = np.concatenate(he_parts), np.concatenate(ihc_parts)
        run.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, he=he_emb, ihc=ihc_emb)

    values, labels, slide_of, slide_labels, sources, train = [], [], [], [], [], []
    for s, p in enumerate(pairs):
        v, lab, sl, src = tile_labels(p, bins, options.readout_measure
                                      if options.uses_measure else None, table)
        values.append(v)
        labels.append(lab)
        slide_of.append(np.full(len(p.he), s))
        slide_labels.append(sl)
        sources.append(src)
        train.append(_split(len(p.he), options.val, options.seed, p.name))
    data = AlignData(he=he_emb, ihc=ihc_emb, labels=np.concatenate(labels),
                     slide=np.concatenate(slide_of),
                     slide_labels=np.asarray(slide_labels, np.int64),
                     train=np.concatenate(train))
    if not (data.labels[data.train] >= 0).any():
        raise UsageError("no training tile has a class: check --labels (tile x, y are level-0 "
                         "px of the H&E image) or use --classes with thresholds")
    config = HeadsConfig(dim=int(he_emb.shape[1]), classes=bins.names, pool=options.pool)
    key = hashlib.sha256(json.dumps({
        "data": data_key, "labels": data.labels.tolist(), "slides": slide_labels,
        "train": data.train.tolist(), "heads": config.as_dict(),
        "loop": vars(loop) | {"steps": None}}).encode()).hexdigest()[:16]
    progress.start("train-align", options.steps)

    def on_step(step: int) -> None:
        progress.advance(1)
        check()

    heads, history = train_heads(data, config, loop, run, key, on_step)
    metrics = align_metrics(heads, data, pairs, values, sources)

    folder.mkdir(parents=True, exist_ok=True)
    weights = save_heads(heads, folder / HEADS)
    with atomic_path(folder / "history.json") as tmp:
        tmp.write_text(json.dumps(history))
    with atomic_path(folder / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics.as_dict(), indent=2))
    loss_curve(history, folder / "loss.png", keys=("loss", "infonce", "ce", "slide"))
    how = (f"HistoStainAlign heads on {enc_card.name} tokens, at {mpp} µm/px, {side}-px tiles. "
           "Pairs: " + ", ".join(f"{p.he_path.name} + {p.ihc_path.name} ({len(p.he)} tiles, "
                                 f"{p.registration.get('method')})" for p in pairs)
           + (f". Tile classes: {options.readout_measure} of the IHC tile (readout) binned "
              f"as {bins.text()}"
              if options.uses_measure else f". Labels: {options.labels}")
           + f". {len(history)} steps of {loop.batch} pairs, seed {loop.seed}, "
             f"{options.val:g} of each pair's tiles held out (stainctl train-align).")
    card = ModelCard(
        name=name, kind="classifier", engine="align", marker=options.marker.lower(),
        encoder=enc_card.name, input_mpp=mpp, tile_size=side, licence="as the training images",
        intended_use="Research only; not validated. A predicted IHC pattern is not a stained "
                     "one.",
        training_data=how,
        description=f"{options.marker} pattern classes ({', '.join(bins.names)}) from H&E "
                    f"tiles, slide class by {options.pool} pooling.",
        architecture={**config.as_dict(),
                      "measure": options.readout_measure if options.uses_measure else "",
                      "bins": bins.text(),
                      "training_slides": [p.name for p in pairs]},
        weights=(WeightFile(role="heads", path=HEADS,
                            sha256=sha256_of(weights)),),
        metrics=metrics.card())
    card_file = write_card(card, folder / "card.toml")
    installed = card_file
    if folder.resolve() != (directory / name).resolve():
        installed = install(card_file, [weights], directory)
    return AlignResult(name=name, card=installed, folder=folder, tiles=len(data.he),
                       steps=len(history), history=history, metrics=metrics)
