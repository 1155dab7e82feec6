"""The `pixcell` engine: H&E tiles -> UNI2-h tokens -> flow MLP -> PixCell (+ LoRA) -> VAE.

It takes tiles of exactly the side the transformer was trained on (1024 px for PixCell-1024),
context included: a workspace tiled at 1024 - 2 x overlap gives each generated tile an overlap
band on every side, which `stitch` blends. Weights come from the card (or, for a train-lora model,
from its base card): the transformer and VAE as diffusers safetensors, a released LoRA (`lora`,
a full-state-dict .pth) or a train-lora adapter (`adapter`), and the flow MLP (`flow_mlp`, or the
one of the card named by `flow_from`); a card without a flow MLP is the "no flow" variant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.base import EngineOptions
from stainctl.engines.pixcell.config import DEFAULT_OVERLAP, PixCellConfig
from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

log = logging.getLogger(__name__)

# torch.compile's backend for the transformer blocks: inductor's fused kernels are what was
# measured (0.80 -> 0.62 s/tile on an H200, bench/RESULTS.md). A module constant so that tests
# can use torch's "eager"/"aot_eager" backends, which need no C compiler.
COMPILE_BACKEND: Any = "inductor"


def _diffusers() -> None:
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()  # diffusers may import peft -> transformers -> torchvision
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ModelError("the pixcell engine needs diffusers and peft: pip install -c "
                         f"constraints.txt 'stainctl[pixcell]' ({err})") from None


@dataclass
class PixCellParts:
    """The networks of one PixCell model, on one device."""

    config: PixCellConfig
    transformer: Any
    vae: Any
    encoder: Any  # a TileEncoder (UNI2-h)
    flow: Any | None


DEFAULT_STEPS = 20  # DPM-Solver++ steps when --steps is not given


class PixCellEngine:
    """uint8 RGB tiles of `input_side` px in, generated uint8 RGB tiles of the same size out
    (an `engines.base.Engine`)."""

    multiple = 1
    deterministic = False  # each tile's noise comes from its seed

    def __init__(self, card: ModelCard, parts: PixCellParts, sampling: EngineOptions,
                 device: str = "cpu") -> None:
        import torch

        from stainctl.engines.precision import resolve_dtype

        self.card, self.parts, self.sampling = card, parts, sampling
        self.device = torch.device(device)
        self.dtype = resolve_dtype(sampling.dtype, self.device)
        self.input_side: int | None = parts.config.image_size
        self.margin = int(card.architecture.get("margin", DEFAULT_OVERLAP))
        self.steps = sampling.steps or DEFAULT_STEPS
        for net in (parts.transformer, parts.vae, parts.flow):
            if net is not None:
                net.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda" and self.dtype != torch.float32:
            parts.transformer.to(self.dtype)  # half the memory traffic per step
        # The blocks as built while compiled ones run in their place, else None. Compiling is
        # not in settings(): like the device and the batch size it changes floating-point
        # rounding only, not what the model makes.
        self.eager_blocks: list[Any] | None = None
        if sampling.compiles(self.device):
            self.compile_blocks()

    @property
    def compiled(self) -> bool:
        return self.eager_blocks is not None

    def compile_blocks(self) -> None:
        """torch.compile each transformer block (regional: the identical blocks share one
        compiled graph, so compiling costs seconds, not minutes; the first call compiles).
        dynamic=False: a partial last batch has another shape and is compiled again, once per
        size and process (seconds on a GPU). That is accepted rather than padding the batch:
        padding would sample up to batch - 1 wasted tiles at every slide's end (~0.6 s each on
        an H200) and turn each one-tile glass measurement into a whole batch."""
        import torch

        if self.compiled:
            return
        blocks = self.parts.transformer.transformer_blocks
        self.eager_blocks = list(blocks)
        try:
            for i, block in enumerate(self.eager_blocks):
                blocks[i] = torch.compile(block, dynamic=False, backend=COMPILE_BACKEND)
        except Exception as err:  # no dynamo on this Python, an unknown backend
            self.uncompile_blocks()
            self._warn_fell_back(err)

    def uncompile_blocks(self) -> None:
        """Put the blocks as built back (eager from here on)."""
        if self.eager_blocks is None:
            return
        blocks = self.parts.transformer.transformer_blocks
        for i, block in enumerate(self.eager_blocks):
            blocks[i] = block
        self.eager_blocks = None

    def _warn_fell_back(self, err: Exception) -> None:
        root: BaseException = err  # dynamo wraps the backend's error (BackendCompilerFailed)
        while isinstance(getattr(root, "inner_exception", None), BaseException):
            root = root.inner_exception  # type: ignore[attr-defined]
        while root.__cause__ is not None:
            root = root.__cause__
        cause = next(iter(str(root).strip().splitlines()), "")[:200]
        log.warning("%s: torch.compile of the transformer failed (%s: %s); running it "
                    "uncompiled for the rest of this run (--no-compile skips compiling)",
                    self.card.name, type(root).__name__, cause)

    def _denoise(self, sample: Callable[[], Any]) -> Any:
        """sample() with the compiled blocks; if it raises (compiling happens in the first call:
        no C compiler, no triton, an unsupported op), once: the eager blocks back and sample()
        again from the same noise, so the batch gives the tiles eager gives. An error that is
        not compile's (eager fails too: out of memory, a bug) raises from the eager run and
        leaves the blocks compiled for the next batch."""
        if not self.compiled:
            return sample()
        try:
            return sample()
        except Exception as err:
            failed = err
        self.uncompile_blocks()
        try:
            out = sample()
        except Exception:
            self.compile_blocks()
            raise
        self._warn_fell_back(failed)
        return out

    def tokens(self, tiles: np.ndarray) -> Any:
        """Conditioning tokens (B, T, D) of H&E tiles: UNI2-h, then the flow to IHC style."""
        return self.ihc_tokens(self.he_tokens(tiles))

    def he_tokens(self, tiles: np.ndarray) -> Any:
        tokens = self.parts.encoder.encode(tiles).to(self.device)
        if tokens.shape[1] != self.parts.config.tokens:
            raise ModelError(f"{self.card.name} is conditioned on {self.parts.config.tokens} "
                             f"tokens a tile; the encoder gave {tokens.shape[1]}")
        return tokens

    def ihc_tokens(self, tokens: Any) -> Any:
        from stainctl.engines.pixcell.flow import translate_tokens

        if self.parts.flow is not None:
            tokens = translate_tokens(self.parts.flow, tokens, self.parts.config.flow_steps)
        return tokens

    def settings(self) -> Mapping[str, object]:
        out: dict[str, object] = {"steps": self.steps,
                                  "guidance": self.sampling.guidance,
                                  "dtype": self.sampling.dtype}
        if self.sampling.sampler != "dpm++":  # absent = the default: older stores stay valid
            out["sampler"] = self.sampling.sampler
        if self.structured:
            out["structure"] = self.sampling.structure
            out["eta"] = self.sampling.eta or "zero"
        return out

    @property
    def structured(self) -> bool:
        """--structure below 1: HistDiST's inversion recipe; at 1 the whole schedule is made
        again, which is ordinary generation from the tile's seed."""
        return self.sampling.structure is not None and self.sampling.structure < 1

    def close(self) -> None:
        for net in (self.parts.transformer, self.parts.vae, self.parts.flow):
            if net is not None:
                net.to("cpu")

    def translate(self, tiles: np.ndarray, seeds: Sequence[int] | None = None) -> np.ndarray:
        from stainctl.engines.pixcell.sampling import (
            decode_latents,
            initial_noise,
            sample_latents,
        )

        b, h, w, _ = tiles.shape
        if h != self.input_side or w != self.input_side:
            raise ModelError(f"{self.card.name} generates {self.input_side}-px tiles; got "
                             f"{w} x {h}")
        seeds = list(range(b)) if seeds is None else [int(s) for s in seeds]
        if self.structured:
            return self._structured(tiles, seeds)
        cond = self.tokens(tiles)
        side = h // self.parts.config.downscale  # h is input_side
        noise = initial_noise(seeds, (self.parts.config.latent_channels, side, side))
        transformer = self.parts.transformer
        latents = self._denoise(lambda: sample_latents(
            transformer, self.parts.config.scheduler, cond, transformer.uncond_embedding.float(),
            noise.to(self.device), self.steps, self.sampling.guidance, self.dtype,
            self.sampling.sampler))
        return decode_latents(self.parts.vae, latents, self.dtype).numpy()

    def _structured(self, tiles: np.ndarray, seeds: list[int]) -> np.ndarray:
        import torch

        from stainctl.engines.ddim import eta_schedule
        from stainctl.engines.pixcell.sampling import (
            decode_latents,
            encode_latents,
            invert_and_sample,
        )

        assert self.sampling.structure is not None
        he = self.he_tokens(tiles)
        cond = self.ihc_tokens(he)
        images = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        start = encode_latents(self.parts.vae, images, self.dtype)
        transformer = self.parts.transformer
        structure = self.sampling.structure
        latents = self._denoise(lambda: invert_and_sample(
            transformer, self.parts.config.scheduler, he, cond,
            transformer.uncond_embedding.float(), start, self.steps, structure,
            self.sampling.guidance, self.dtype, eta_schedule(self.sampling.eta or "zero"), seeds))
        return decode_latents(self.parts.vae, latents, self.dtype).numpy()


def build_transformer(config: PixCellConfig) -> Any:
    _diffusers()
    from stainctl.engines.pixcell.transformer import PixCellTransformer2DModel

    return PixCellTransformer2DModel(**config.transformer)


def build_vae(config: PixCellConfig) -> Any:
    _diffusers()
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config.vae)


def load_into(net: Any, path: Path, what: str, computed: tuple[str, ...] = ()) -> None:
    """Load a state dict strictly, except buffers this code computes itself (`computed`), which
    a file may hold or not."""
    from stainctl.models.weights import load_state_dict

    state = load_state_dict(path)
    own = net.state_dict()
    result = net.load_state_dict({k: v for k, v in state.items()
                                  if k in own or k not in computed}, strict=False)
    missing = [k for k in result.missing_keys if k not in computed]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[:3]
        raise ModelError(f"{path} does not fit the {what} of the card "
                         f"({'missing' if missing else 'unexpected'}: {', '.join(bad)})")


def load_parts(card: ModelCard, directory: Path, device: str = "cpu",
               encoder_dtype: str = "fp32") -> PixCellParts:
    from stainctl.engines.pixcell.flow import FlowMLP
    from stainctl.engines.pixcell.lora import merge_released_lora
    from stainctl.models.encoders import load_encoder
    from stainctl.models.lora import load_adapted
    from stainctl.models.registry import get_card
    from stainctl.models.weights import resolve

    _diffusers()
    roles = {w.role for w in card.weights}
    base = card
    if card.architecture.get("base"):
        base = get_card(str(card.architecture["base"]), directory)
        if base.engine != "pixcell":
            raise ModelError(f"model {card.name}: its base {base.name} is not a pixcell model")
    config = PixCellConfig.from_card(base)  # a marker card without a base is its own base
    owner = card if "transformer" in roles else base
    transformer = build_transformer(config)
    # Position tables are functions of the configuration; an export may leave them out.
    load_into(transformer, resolve(owner, "transformer", directory), "transformer",
              ("y_pos_embed.y_pos_embed", "pos_embed.pos_embed"))
    if "lora" in roles:
        transformer = merge_released_lora(transformer, resolve(card, "lora", directory),
                                          card.architecture.get("alpha"))
    elif "adapter" in roles:
        transformer = load_adapted(transformer, resolve(card, "adapter", directory))
    vae = build_vae(config)
    load_into(vae, resolve(card if "vae" in roles else base, "vae", directory), "VAE")
    flow = None
    flow_card = card
    if "flow_mlp" not in roles and card.architecture.get("flow_from"):
        flow_card = get_card(str(card.architecture["flow_from"]), directory)
    if any(w.role == "flow_mlp" for w in flow_card.weights):
        flow = FlowMLP(**config.flow)
        load_into(flow, resolve(flow_card, "flow_mlp", directory), "flow MLP")
    encoder_name = card.encoder or base.encoder
    if not encoder_name:
        raise ModelError(f"model {card.name}: its card names no encoder (e.g. uni2-h)")
    encoder = load_encoder(get_card(encoder_name, directory), directory, device=device,
                           dtype=encoder_dtype)
    return PixCellParts(config, transformer, vae, encoder, flow)


def load_pixcell_engine(card: ModelCard, directory: Path,
                        options: EngineOptions | None = None) -> PixCellEngine:
    from stainctl.engines.precision import resolve_dtype
    from stainctl.models.encoders import resolve_device

    sampling = options or EngineOptions(device="cpu")
    device = resolve_device(sampling.device)
    import torch

    resolve_dtype(sampling.dtype, torch.device(device))  # fp16 on a CPU: say so before loading
    encoder_dtype = "bf16" if sampling.dtype in ("bf16", "fp16") or (
        sampling.dtype == "auto" and device.startswith("cuda")) else "fp32"
    parts = load_parts(card, directory, device, encoder_dtype)
    return PixCellEngine(card, parts, sampling, device)
