"""What a translation engine is, and the registry from a card's `engine` name to its loader.

An engine takes uint8 RGB H&E tiles with their context margin on each side and gives uint8 RGB
IHC-style tiles of the same size. The translate step knows engines only through `Engine` and
`EngineSpec`: adding an engine is a package under `engines/` plus one `register` call here (or in
the code that adds it); no step changes. Registering imports nothing heavy: the loader is named
as "module:function" and imported the first time a card of that engine is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from stainctl.errors import ModelError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from stainctl.models.card import ModelCard

DTYPES = ("auto", "bf16", "fp16", "fp32")
# Diffusion samplers (`--sampler`): the DPM-Solver++ 2M its model ships with, the same with Karras
# sigmas, or UniPC (bh2), both of which keep more quality at few steps (`--steps 8`).
SAMPLERS = ("dpm++", "dpm++-karras", "unipc")
# Where HistDiST standardises the inverted latent: at its end (published), every step, never.
LATENT_NORMS = ("inversion", "steps", "none")
# torch.compile of a diffusion engine's network (`--compile/--no-compile`): auto compiles on a
# CUDA device, where it was measured to help (bench/RESULTS.md), and never on a CPU.
COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How to run an engine: where, at what precision, and (diffusion engines) how to sample.
    Deterministic engines ignore the sampling fields."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # bf16 on a GPU, fp32 on a CPU
    steps: int | None = None  # diffusion steps; None: the engine's (pixcell 20, histdist 100)
    guidance: float = 1.2  # classifier-free guidance; <= 1: conditional pass only
    sampler: str = "dpm++"  # one of SAMPLERS
    # Inversion (histdist; pixcell with --structure): DDIM steps back to noise, the η schedules
    # of the inversion and of the denoising (engines.ddim), the histdist UNet's prediction type
    # and where its inverted latent is standardised; None: the engine's published default.
    inversion_steps: int | None = None
    eta: str | None = None
    inversion_eta: str = "zero"
    prediction: str | None = None
    latent_norm: str = "inversion"  # inversion, steps or none
    structure: float | None = None  # pixcell: invert up to this fraction of the schedule
    compile: str = "auto"  # one of COMPILE_MODES (pixcell; the others ignore it)

    def __post_init__(self) -> None:
        from stainctl.engines.ddim import PREDICTIONS, eta_schedule

        if (self.steps is not None and self.steps < 1) or (
                self.inversion_steps is not None and self.inversion_steps < 1):
            raise UsageError("--steps and --inversion-steps must be at least 1")
        for schedule in (self.eta, self.inversion_eta):
            if schedule is not None:
                eta_schedule(schedule)
        if self.prediction is not None and self.prediction not in PREDICTIONS:
            raise UsageError(f"--prediction-type must be one of {', '.join(PREDICTIONS)}, "
                             f"got {self.prediction}")
        if self.latent_norm not in LATENT_NORMS:
            raise UsageError(f"--latent-norm must be one of {', '.join(LATENT_NORMS)}, "
                             f"got {self.latent_norm}")
        if self.structure is not None and not 0 < self.structure <= 1:
            raise UsageError(f"--structure must be in (0, 1], got {self.structure}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, "
                             f"got {self.sampler}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype}")
        if self.compile not in COMPILE_MODES:
            raise UsageError(f"compile must be one of {', '.join(COMPILE_MODES)}, "
                             f"got {self.compile}")

    def compiles(self, device: torch.device) -> bool:
        """Whether an engine running on `device` compiles its network."""
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")


class Engine(Protocol):
    """A loaded model, ready to translate batches of tiles."""

    card: ModelCard
    margin: int  # default context px on each side of a grid tile (the card's)
    multiple: int  # an input side must be a multiple of this
    # The one input side it generates (context included), or None for any side.
    input_side: int | None
    # False where the output depends on the per-tile seeds (diffusion engines).
    deterministic: bool
    device: torch.device  # where it runs (EngineOptions.device resolved)
    dtype: torch.dtype  # the precision it computes in (EngineOptions.dtype resolved)

    def settings(self) -> Mapping[str, object]:
        """The options that change its pixels (recorded with the translated tiles, so a change
        makes the slide again); batching and device are not among them."""
        ...

    def translate(self, tiles: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """(B, H, W, 3) uint8 in, (B, H, W, 3) uint8 out; `seeds`: one per tile."""
        ...

    def close(self) -> None:
        """Free the device memory it holds."""
        ...


Loader = Callable[["ModelCard", Path, EngineOptions], Engine]


@dataclass(frozen=True, kw_only=True)
class EngineShape:
    """What planning a slide needs of a loaded engine: its tile geometry and the settings
    recorded with its tiles. Plain data, so a cluster's worker, which loads the engine anyway,
    can send it to the driver, which then loads no model."""

    margin: int
    multiple: int
    input_side: int | None
    deterministic: bool
    settings: dict[str, object]
    # Where --batch-size and --readers are not given: what suits this engine where it runs.
    batch_size: int = 8
    readers: int = 2

    @classmethod
    def of(cls, engine: Engine) -> EngineShape:
        from stainctl.cluster.pin import io_threads  # a worker's cpuset, not the host's

        gpu = engine.device.type == "cuda"
        return cls(margin=engine.margin, multiple=engine.multiple,
                   input_side=engine.input_side, deterministic=engine.deterministic,
                   settings=dict(engine.settings()),
                   batch_size=int(getattr(engine, "gpu_batch", 8)) if gpu else 8,
                   readers=io_threads() if gpu else 2)


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    name: str
    loader: str | Loader  # "package.module:function", imported on first use, or the function
    # A fixed-size generator takes tiles of the card's tile_size with the overlap bands
    # included, so the grid is that side less two overlaps; otherwise the grid is the card's
    # tile_size and the context goes around it.
    fixed_side: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.loader, str) and ":" not in self.loader:
            raise ValueError(f"engine {self.name}: loader must be 'module:function'")

    def load(self, card: ModelCard, directory: Path, options: EngineOptions) -> Engine:
        loader = self.loader
        if isinstance(loader, str):
            module, function = loader.split(":")
            loader = getattr(importlib.import_module(module), function)
        return loader(card, directory, options)

    def grid_tile_size(self, card: ModelCard, overlap: int | None) -> int:
        """The tile size to tile a slide at for `card` (`overlap`: --overlap, or None)."""
        if not self.fixed_side:
            return int(card.tile_size)
        if overlap is None:
            overlap = int(card.architecture.get("margin", DEFAULT_FIXED_OVERLAP))
        size = int(card.tile_size) - 2 * overlap
        if overlap < 0 or size < card.tile_size // 2:
            raise UsageError(f"--overlap must be between 0 and {card.tile_size // 4} px for "
                             f"{card.name} ({card.tile_size}-px tiles)")
        return size


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same in every process (unlike hash())."""
    text = "/".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def tile_seed(seed: int, slide: str, col: int, row: int) -> int:
    """A fixed seed per (run seed, slide, tile), independent of batching and order: reruns and
    resumed runs of a diffusion engine give the same slide."""
    return stable_seed(seed, slide, col, row)


# Context px each side of a fixed-size generator's tile unless its card or --overlap says.
DEFAULT_FIXED_OVERLAP = 64

_ENGINES: dict[str, EngineSpec] = {}


def register(spec: EngineSpec) -> None:
    _ENGINES[spec.name] = spec


def unregister(name: str) -> None:
    _ENGINES.pop(name, None)


def engine_spec(card: ModelCard) -> EngineSpec:
    spec = _ENGINES.get(card.engine)
    if spec is None:
        raise ModelError(f"model {card.name} needs the {card.engine!r} engine, which this "
                         f"version of stainctl does not have (it has: "
                         f"{', '.join(sorted(_ENGINES))}); use another model "
                         "(stainctl models list)")
    return spec


def load_engine(card: ModelCard, directory: Path, options: EngineOptions) -> Engine:
    return engine_spec(card).load(card, directory, options)


register(EngineSpec(name="fast", loader="stainctl.engines.fast.engine:load_fast_engine"))
register(EngineSpec(name="pixcell", loader="stainctl.engines.pixcell.engine:load_pixcell_engine",
                    fixed_side=True))
# A stain normaliser (`normalize --method stainfuser`): its engine also takes the reference image.
register(EngineSpec(name="stainfuser",
                    loader="stainctl.engines.stainfuser.engine:load_stainfuser_engine",
                    fixed_side=True))
register(EngineSpec(name="histdist",
                    loader="stainctl.engines.histdist.engine:load_histdist_engine",
                    fixed_side=True))
