"""The `stainfuser` engine: source H&E tiles -> the reference's stain, by conditional diffusion.

As the authors run it (R-J96/stainFuser `src/models/wsi.py`, `src/recipe.py`): the reference
image (resized to the tile size, RGB in [0, 1]) is encoded by the SD 2.1 VAE, scaled by its
scaling factor and flattened into (H/8 x W/8) tokens of 4 channels, which a linear layer lifts to
the UNet's cross-attention width (in both the UNet and the ControlNet-like conditioner). The
conditioner takes the source tile itself (RGB in [0, 1]) and adds its residuals to the UNet,
which denoises 4-channel latents with the PNDM scheduler for 20 steps (no guidance); the VAE
decodes, [-1, 1] -> 0-255. Differences, each to make a slide independent of batching and
re-runs: each tile's starting noise comes from its own seed (run seed, slide, tile); the source
is scaled by 1/255 per tile (the authors min-max normalise each batch as a whole); the reference
latents are the VAE's sample drawn once with a fixed seed (they draw a new one per batch).

It is GPU-class: SD 2.1-base at 512 px, 20 steps, two networks per step. Weights: one
safetensors file of the authors' `StainFuserArchitecture` state dict (`encoder.*` the VAE,
`conditioner.*`, `noise_predictor.*`), the card's `checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.base import EngineOptions
from stainctl.engines.stainfuser.config import MARGIN, StainFuserConfig
from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

REFERENCE_SEED = 0  # the reference latents' one draw


def _diffusers() -> None:
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ModelError("the stainfuser engine needs diffusers: pip install -c "
                         f"constraints.txt 'stainctl[pixcell]' ({err})") from None


@dataclass
class StainFuserParts:
    """The networks of one StainFuser model (module names as in the authors' state dict)."""

    config: StainFuserConfig
    networks: Any  # torch.nn.Module with .encoder (VAE), .conditioner, .noise_predictor


def build_networks(config: StainFuserConfig) -> Any:
    """The authors' architecture: a UNet and a ControlNet made from its configuration, each with
    an `encoder_projector` (Linear, latent channels -> cross-attention width), and the VAE."""
    _diffusers()
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    unet: Any = UNet2DConditionModel(**config.unet)
    conditioner: Any = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=config.conditioning_channels,
        load_weights_from_unet=False)
    width, tokens = int(config.unet["cross_attention_dim"]), config.latent_channels
    unet.encoder_projector = torch.nn.Linear(tokens, width)
    conditioner.encoder_projector = torch.nn.Linear(tokens, width)
    nets: Any = torch.nn.Module()
    nets.encoder = AutoencoderKL(**config.vae)
    nets.conditioner = conditioner
    nets.noise_predictor = unet
    return nets


def load_networks(networks: Any, path: Path) -> None:
    """The authors' checkpoint into `networks`, strictly (a data-parallel `module.` prefix is
    taken off, as their loader does)."""
    from stainctl.models.weights import load_state_dict

    state = load_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    result = networks.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[:3]
        raise ModelError(f"{path} does not fit the StainFuser networks of the card "
                         f"({'missing' if result.missing_keys else 'unexpected'}: "
                         f"{', '.join(bad)})")


class StainFuserEngine:
    """uint8 RGB source tiles of `input_side` px in, the same tiles in the reference's stain out
    (an `engines.base.Engine`; `set_reference` first)."""

    multiple = 8
    deterministic = False  # each tile's noise comes from its seed

    def __init__(self, card: ModelCard, parts: StainFuserParts, sampling: EngineOptions,
                 device: str = "cpu") -> None:
        import torch

        from stainctl.engines.precision import resolve_dtype

        self.card, self.parts, self.sampling = card, parts, sampling
        self.device = torch.device(device)
        self.dtype = resolve_dtype(sampling.dtype, self.device)
        self.input_side: int | None = parts.config.image_size
        self.margin = int(card.architecture.get("margin", MARGIN))
        parts.networks.eval().requires_grad_(False).to(self.device)
        self.reference: Any = None  # (1, tokens, channels) latents of the reference

    def set_reference(self, image: np.ndarray) -> None:
        """The image whose stain the tiles take (uint8 RGB, any size: resized to the tile size,
        nearest neighbour, as the authors do)."""
        import cv2
        import torch

        side = self.parts.config.image_size
        if image.shape[:2] != (side, side):
            image = cv2.resize(np.ascontiguousarray(image[..., :3]), (side, side),
                               interpolation=cv2.INTER_NEAREST)
        x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)[None]
        x = (x.float() / 255).to(self.device)  # [0, 1], as their ToTensor() target
        vae = self.parts.networks.encoder
        generator = torch.Generator(device=self.device).manual_seed(REFERENCE_SEED)
        with torch.no_grad(), self._autocast():
            latents = vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor
        b, c = latents.shape[:2]
        self.reference = latents.float().reshape(b, c, -1).permute(0, 2, 1)

    def settings(self) -> Mapping[str, object]:
        return {"steps": self.sampling.steps, "dtype": self.sampling.dtype}

    def close(self) -> None:
        self.parts.networks.to("cpu")

    def _autocast(self) -> Any:
        from stainctl.engines.precision import autocast

        return autocast(self.device, self.dtype)

    def translate(self, tiles: np.ndarray, seeds: Sequence[int] | None = None) -> np.ndarray:
        import torch
        from diffusers import PNDMScheduler

        if self.reference is None:
            raise ModelError(f"{self.card.name}: no reference image set (set_reference)")
        b, h, w, _ = tiles.shape
        if h != self.input_side or w != self.input_side:
            raise ModelError(f"{self.card.name} normalises {self.input_side}-px tiles; got "
                             f"{w} x {h}")
        seeds = list(range(b)) if seeds is None else [int(s) for s in seeds]
        config, nets = self.parts.config, self.parts.networks
        down = config.downscale
        shape = (config.latent_channels, h // down, w // down)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(self.device)
        source = torch.from_numpy(np.ascontiguousarray(tiles[..., :3])).to(self.device)
        source = source.permute(0, 3, 1, 2).float() / 255
        scheduler: Any = PNDMScheduler(**config.scheduler)  # PNDM keeps state: one per batch
        scheduler.set_timesteps(self.sampling.steps, device=self.device)
        tokens = self.reference.expand(b, -1, -1)
        unet, conditioner = nets.noise_predictor, nets.conditioner
        latents = noise * scheduler.init_noise_sigma
        with torch.no_grad(), self._autocast():
            ctx_c = conditioner.encoder_projector(tokens)
            ctx_u = unet.encoder_projector(tokens)
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(latents, t)
                down_res, mid_res = conditioner(x, t, encoder_hidden_states=ctx_c,
                                                controlnet_cond=source, return_dict=False)
                eps = unet(x, t, encoder_hidden_states=ctx_u,
                           down_block_additional_residuals=down_res,
                           mid_block_additional_residual=mid_res, return_dict=False)[0]
                latents = scheduler.step(eps.float(), t, latents, return_dict=False)[0]
            vae = nets.encoder
            image = vae.decode(latents / vae.config.scaling_factor).sample
        out = ((image.float().clamp(-1, 1) + 1) * 127.5).round()
        return out.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def load_stainfuser_engine(card: ModelCard, directory: Path,
                           options: EngineOptions | None = None) -> StainFuserEngine:
    import torch

    from stainctl.engines.precision import resolve_dtype
    from stainctl.models.encoders import resolve_device
    from stainctl.models.weights import resolve

    sampling = options or EngineOptions(device="cpu")
    device = resolve_device(sampling.device)
    resolve_dtype(sampling.dtype, torch.device(device))  # fp16 on a CPU: say so before loading
    config = StainFuserConfig.from_card(card)
    networks = build_networks(config)
    load_networks(networks, resolve(card, "checkpoint", directory))
    return StainFuserEngine(card, StainFuserParts(config, networks), sampling, device)
