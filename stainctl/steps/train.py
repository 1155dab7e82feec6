"""Training as a step: prepare the training set, hand arrays and records to an engine's trainer,
and leave a model folder (card, weights, history, loss curve) where `translate` finds it.

  * `train_fast_model` (`stainctl train`): a fast generator from scratch, from whole H&E and IHC
    images brought to 0.5 µm/px, a held-out strip of each IHC image for evaluation, and roughly
    aligned pairs registered on their landmarks;
  * `adapt_fast` (`train-lora --engine fast`): LoRA on an installed fast model;
  * `adapt_pixcell` (`train-lora --engine pixcell`): the IHC slides tiled and filtered into a
    workspace, the kept tiles embedded (the `embed` step) and VAE-encoded, then LoRA on PixCell.
Engines never import steps: the trainers below take what these functions prepare.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import UsageError
from stainctl.models.card import NAME_RULE, valid_name
from stainctl.steps.report import Progress, SilentProgress

if TYPE_CHECKING:
    import torch

    from stainctl.engines.fast.adapt import AdaptOptions, AdaptResult
    from stainctl.engines.fast.model import FastGenerator
    from stainctl.engines.pixcell.engine import PixCellParts
    from stainctl.engines.pixcell.train import (
        PixCellLoraOptions,
        PixCellLoraResult,
        TrainingSet,
    )
    from stainctl.workspace import Workspace

log = logging.getLogger(__name__)
GENERATOR = "generator.safetensors"
Echo = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class FastTrainOptions:
    """`stainctl train`: a fast model from unpaired H&E and IHC images (+ optional pairs)."""

    marker: str
    he: tuple[Path, ...]
    ihc: tuple[Path, ...]
    pairs: tuple[tuple[Path, Path], ...] = ()  # roughly aligned (H&E, IHC) serial sections
    name: str = ""  # default <marker>-fast
    out: Path | None = None  # the model folder; default <models dir>/<name>
    models_dir: Path | None = None
    steps: int = 2000
    batch: int = 4
    crop: int = 256
    seed: int = 0
    default_mpp: float | None = 0.5  # for images without a pixel size (PNG, JPEG)
    hold_out: float = 0.0  # fraction of each IHC image's width kept out of training
    validation: float = 0.0  # fraction of the rest's height kept out, to choose checkpoints on
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    loss_weights: tuple[tuple[str, float], ...] = ()  # (name, weight) over TrainConfig's
    init: str = ""  # an installed fast model whose generator weights the run starts from

    def __post_init__(self) -> None:
        from stainctl.engines.fast.train import WEIGHTS

        for key, value in self.loss_weights:
            if key not in WEIGHTS:
                raise UsageError(f"--loss-weight {key}: no such loss; one of "
                                 f"{', '.join(WEIGHTS)}")
            if not value >= 0:
                raise UsageError(f"--loss-weight {key}={value}: a weight must be >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.marker or not self.he or not self.ihc:
            raise UsageError("stainctl train needs --marker, H&E images (--he) and IHC images "
                             "(--ihc)")
        if min(self.steps, self.batch) < 1 or self.crop < 32 or self.crop % 16:
            raise UsageError("--steps and --batch must be at least 1, and --crop a multiple of "
                             "16 of at least 32")
        if not 0 <= self.hold_out < 1:
            raise UsageError(f"--hold-out must be in [0, 1), got {self.hold_out}")
        if not 0 <= self.validation < 1:
            raise UsageError(f"--validation must be in [0, 1), got {self.validation}")
        if not valid_name(self.model_name):
            raise UsageError(f"--name {self.model_name!r}: {NAME_RULE}")
        names = [image_name(p) for p in self.ihc]
        if len(set(names)) < len(names):
            raise UsageError("--ihc: two images share a name; their held-out crops would collide")

    @property
    def model_name(self) -> str:
        return self.name or f"{self.marker.lower()}-fast"


@dataclass(frozen=True, kw_only=True)
class FastTrainResult:
    name: str
    card: Path  # the installed card, where translate finds it
    folder: Path  # the run's folder: card, generator, history, loss curve, held_out/, run/
    steps: int
    parameters: int
    final_loss: float
    held_out: int  # crops written to folder/held_out
    validation: int = 0  # crops written to folder/validation


def image_name(path: Path) -> str:
    return Path(path).name.split(".")[0]


def train_fast_model(options: FastTrainOptions, log: bool = True) -> FastTrainResult:
    """Train, export, write the card and install the model; a re-run resumes from the last
    checkpoint in `<folder>/run/`."""
    from stainctl.engines.fast.data import (
        load_image,
        load_pair,
        validation_split,
        write_held_out,
    )
    from stainctl.engines.fast.model import FastConfig, parameter_count
    from stainctl.engines.fast.train import WEIGHTS, TrainConfig, export, train
    from stainctl.models.adapted import loss_curve
    from stainctl.models.card import ModelCard, WeightFile, write_card
    from stainctl.models.encoders import resolve_device
    from stainctl.models.registry import SHIPPED, install, models_dir
    from stainctl.models.weights import sha256_of

    name = options.model_name
    if (SHIPPED / f"{name}.toml").exists():
        raise UsageError(f"{name} is a model shipped with stainctl; give the new one another "
                         "--name")
    directory = models_dir(options.models_dir)
    folder = options.out or directory / name
    device = resolve_device(options.device)
    config = TrainConfig(marker=options.marker.lower(), crop=options.crop, batch=options.batch,
                         steps=options.steps, seed=options.seed, device=device,
                         model=FastConfig(markers=(options.marker.lower(),)))
    # Names checked against WEIGHTS (FastTrainOptions); mypy cannot follow the **-spread.
    config = replace(config, **{f"w_{k}": v for k, v in options.loss_weights})  # type: ignore[arg-type]
    he = [load_image(p, config.mpp, options.default_mpp) for p in options.he]
    ihc = {image_name(p): load_image(p, config.mpp, options.default_mpp) for p in options.ihc}
    held_out = folder / "held_out"
    if options.hold_out > 0:
        ihc = write_held_out(ihc, options.hold_out, config.crop, held_out)
    validation = folder / "validation"
    if options.validation > 0:
        ihc = write_held_out(ihc, options.validation, config.crop, validation,
                             split=validation_split)
    pairs = [load_pair(a, b, config.mpp, options.default_mpp) for a, b in options.pairs]
    start, init_sha = initial_generator(options.init, config.marker, directory)
    gen, state = train(he, list(ihc.values()), config, folder / "run", log=log,
                       generator=start, pairs=pairs)
    generator = folder / GENERATOR
    export(gen, generator)  # type: ignore[arg-type]
    (folder / "history.json").write_text(json.dumps(state.history))
    loss_curve(state.history, folder / "loss.png",
               keys=("g", "d", *WEIGHTS))  # a term a run does not log is left out
    count = parameter_count(gen)
    how = (f"Unpaired, at {config.mpp} µm/px. H&E: {', '.join(p.name for p in options.he)}. "
           f"IHC: {', '.join(p.name for p in options.ihc)}")
    if options.hold_out > 0:
        how += (f", each less a held-out right-hand strip (--hold-out {options.hold_out}; its "
                f"crops in {held_out.name}/)")
    if options.validation > 0:
        how += (f", and a bottom validation strip of the rest (--validation "
                f"{options.validation}; its crops in {validation.name}/)")
    if options.pairs:
        how += ". Pairs: " + ", ".join(f"{a.name} + {b.name}" for a, b in options.pairs)
    how += (f". {state.step} steps of {config.batch} random {config.crop}-px crops, seed "
            f"{config.seed}, on {device}")
    if options.init:
        how += f", starting from the generator of {options.init} (sha256 {init_sha})"
    if options.loss_weights:
        how += ", loss weights " + ", ".join(f"{k}={v:g}" for k, v in options.loss_weights)
    how += " (stainctl train)."
    card = ModelCard(
        name=name, kind="marker", engine="fast", marker=options.marker.lower(),
        input_mpp=config.mpp, tile_size=512, licence="as the training images",
        intended_use="Research only; not validated. A generated stain is not a measured one.",
        training_data=how,
        description=f"The fast engine ({count / 1e6:.2f} M parameters), float16 weights.",
        architecture={"margin": 32},
        weights=(WeightFile(role="generator", path=GENERATOR,
                            sha256=sha256_of(generator)),))
    card_file = write_card(card, folder / "card.toml")
    installed = card_file
    if folder.resolve() != (directory / name).resolve():
        installed = install(card_file, [generator], directory)
    return FastTrainResult(
        name=name, card=installed, folder=folder, steps=state.step, parameters=count,
        final_loss=float(state.history[-1]["g"]) if state.history else float("nan"),
        held_out=len(list(held_out.glob("*.png"))) if options.hold_out > 0 else 0,
        validation=len(list(validation.glob("*.png"))) if options.validation > 0 else 0)


def initial_generator(init: str, marker: str,
                      directory: Path) -> tuple[FastGenerator | None, str]:
    """`--init`: the generator of the installed fast model `init` (all its weights trained
    further) and its weights' sha256 for the card; (None, "") without one."""
    if not init:
        return None, ""
    from stainctl.engines.fast.engine import load_generator
    from stainctl.models.registry import get_card

    card = get_card(init, directory)
    if card.engine != "fast" or card.architecture.get("base"):
        raise UsageError(f"--init {init}: not a plain fast model (a {card.engine} model or an "
                         "adapter); --init takes one that `stainctl train` made")
    generator: FastGenerator = load_generator(card, directory)
    if marker not in generator.config.markers:
        raise UsageError(f"--init {init}: makes {', '.join(generator.config.markers)}, not "
                         f"{marker}; start from a {marker} model or drop --init")
    return generator, card.weights[0].sha256


def adapt_fast(options: AdaptOptions, log: bool = True) -> AdaptResult:
    """`train-lora --engine fast`: the images at the base model's µm/px, then LoRA on it."""
    from stainctl.engines.fast.adapt import adapt, check_base
    from stainctl.engines.fast.data import load_image
    from stainctl.models.registry import get_card

    base = get_card(options.base, options.models_dir)
    check_base(base)
    mpp = float(base.input_mpp or 0.5)
    he = [load_image(p, mpp, options.default_mpp) for p in options.he]
    ihc = [load_image(p, mpp, options.default_mpp) for p in options.ihc]
    return adapt(options, base, he, ihc, log=log)


def adapt_pixcell(workspace: Path, ihc: list[Path], default_mpp: float | None,
                  options: PixCellLoraOptions, progress: Progress | None = None,
                  echo: Echo | None = None) -> PixCellLoraResult:
    """`train-lora --engine pixcell`: tile and filter `ihc` into `workspace` (or use what it
    holds), then embed, encode and train, holding the workspace's writer lock throughout."""
    from stainctl.engines.pixcell.train import load_base, train_pixcell_lora
    from stainctl.models.registry import get_card, required_cards
    from stainctl.models.weights import check_installed
    from stainctl.workspace import Workspace

    progress = progress or SilentProgress()
    base = get_card(options.base, options.models_dir)
    # Missing base, VAE or encoder weights: say so before tiling the IHC slides.
    check_installed(required_cards(base, options.models_dir), options.models_dir, verify=True)
    ws = Workspace.open(workspace, create=bool(ihc))
    params = {k: str(v) for k, v in vars(options).items()}
    with ws.writing("train-lora", params):
        if ihc:
            from stainctl.slide.grid import GridParams
            from stainctl.slide.inputs import expand_slides
            from stainctl.steps.filter import FilterOptions, filter_slides
            from stainctl.steps.tile import TileOptions, tile_slides

            grid = GridParams(target_mpp=base.input_mpp, tile_size=base.tile_size)
            tile_slides(ws, expand_slides([str(p) for p in ihc], default_mpp),
                        TileOptions(grid=grid), progress)
            filter_slides(ws, FilterOptions(), progress)
        base, parts, device = load_base(options)
        data = pixcell_training_set(ws, parts, options, float(base.input_mpp), device, progress)
        return train_pixcell_lora(base, parts, data, options, device, progress, echo)


def pixcell_training_set(ws: Workspace, parts: PixCellParts, options: PixCellLoraOptions,
                         mpp: float, device: torch.device, progress: Progress) -> TrainingSet:
    """Tokens (from the embed step) and cached VAE latent statistics of up to
    max-tiles-per-slide kept tiles of every filtered slide."""
    from stainctl.engines.pixcell.train import TrainingSet, encode_latents, select_tiles
    from stainctl.slide.tiles import TileSource, read_batches
    from stainctl.steps.embed import EmbedOptions, embed_slides
    from stainctl.workspace import atomic_path

    encoder = parts.encoder.name
    embedded = embed_slides(ws, EmbedOptions(encoder=encoder, models_dir=options.models_dir,
                                             device=str(device)), progress)
    for o in embedded.failed:
        log.warning("%s: not used (%s)", o.slide, o.message)
    cache = options.out / "lora-run" / "latents"
    latents: list[NDArray[np.float16]] = []
    tokens: list[NDArray[np.float16]] = []
    index: list[tuple[int, int]] = []
    side = parts.config.image_size
    for s in ws.manifest.slides_done(ws.embed_step(encoder)):
        grid = ws.manifest.grid(s.id)
        assert grid is not None  # filtered slides have a grid
        if grid.tile_size != side or abs(grid.target_mpp / mpp - 1) > 0.1:
            raise UsageError(f"{ws.root}: {s.key} is tiled at {grid.tile_size} px, "
                             f"{grid.target_mpp} µm/px; {options.base} trains on {side}-px "
                             f"tiles at {mpp} µm/px: re-tile with --tile-size {side} "
                             f"--target-mpp {mpp}")
        files = ws.embedding_files(s.key, encoder)
        ids_all = np.load(files.ids)
        chosen = select_tiles(ids_all, options.max_tiles_per_slide, options.seed, s.key)
        tok = np.load(files.tokens, mmap_mode="r")[np.searchsorted(ids_all, chosen)]
        path = cache / f"{s.key}.{hashlib.sha256(chosen.tobytes()).hexdigest()[:12]}.npy"
        if not path.exists():
            coords = np.array(ws.manifest.tile_positions(s.id, chosen),
                              np.int64).reshape(-1, 2)
            source = TileSource(s.path, grid.extent0, side)
            stats = [encode_latents(parts.vae, batch, device)
                     for batch in read_batches(source, coords, options.batch_size, 2)]
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(stats))
        latents.append(np.load(path, mmap_mode="r"))
        tokens.append(np.asarray(tok))
        index.extend((len(latents) - 1, r) for r in range(len(chosen)))
    if not index:
        raise UsageError(f"no kept IHC tiles to train on in {ws.root}: tile and filter IHC "
                         "slides into it first (or give them with --ihc)")
    return TrainingSet(latents, tokens, np.asarray(index, np.int64))

