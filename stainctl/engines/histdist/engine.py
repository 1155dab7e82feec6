"""The `histdist` engine: H&E tiles -> VAE latent -> DDIM inversion ("H&E" prompt) ->
standardisation -> DDIM translation (Phikon tokens + H&E latent, η-cosine) -> VAE -> IHC tiles.

The defaults are the authors' inference script: 100 inversion steps with η = 0, 100 translation
steps with η = 0.6 - 0.4 cos(πx), v-prediction on zero-terminal-SNR betas with trailing
timesteps, the inverted latent standardised per channel. Tiles are 512 px (the training crops),
context included, like pixcell's fixed-size tiles. Each tile's randomness (the VAE posterior
sample, the η noise) comes from its own seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.engines.base import EngineOptions
from stainctl.engines.histdist.folder import PipelineParts, load_folder
from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

# The published inference defaults (HistDiST inference/inference.py).
DEFAULTS: dict[str, Any] = {"steps": 100, "inversion_steps": 100, "eta": "cosine-20",
                            "inversion_eta": "zero", "prediction": "v_prediction",
                            "latent_norm": "inversion", "prompt": "H&E"}
DEFAULT_MARGIN = 32  # context px each side of a 512-px tile, blended by stitch
ARCHITECTURE_KEYS = {"margin", "prompt", "prediction"}


class HistDiSTEngine:
    """uint8 RGB tiles of `input_side` px in, translated tiles of the same size out."""

    deterministic = False
    multiple = 8  # the VAE downsamples by 8

    def __init__(self, card: ModelCard, parts: PipelineParts, phikon: Any,
                 options: EngineOptions, device: str = "cpu") -> None:
        import torch

        from stainctl.engines.ddim import eta_schedule
        from stainctl.engines.precision import resolve_dtype

        unknown = set(card.architecture) - ARCHITECTURE_KEYS
        if unknown:
            raise ModelError(f"{card.origin}: unknown [architecture] field(s) for the histdist "
                             f"engine: {', '.join(sorted(unknown))}")
        self.card, self.parts, self.phikon, self.options = card, parts, phikon, options
        self.device = torch.device(device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.input_side: int | None = int(card.tile_size)
        self.margin = int(card.architecture.get("margin", DEFAULT_MARGIN))
        self.steps = options.steps or DEFAULTS["steps"]
        self.inversion_steps = options.inversion_steps or DEFAULTS["inversion_steps"]
        self.eta_name = options.eta or DEFAULTS["eta"]
        self.eta = eta_schedule(self.eta_name)
        self.inversion_eta = eta_schedule(options.inversion_eta)
        self.prediction = parts.scheduler.config.prediction_type
        self.latent_norm = options.latent_norm
        prompt = str(card.architecture.get("prompt", DEFAULTS["prompt"]))
        for net in (parts.unet, parts.vae, parts.text_encoder):
            net.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda" and self.dtype != torch.float32:
            for net in (parts.unet, parts.vae, parts.text_encoder, phikon.network):
                net.to(self.dtype)  # the published script runs every network in bf16
        self.prompt_embedding = self._encode_prompt(prompt)
        self.scaling = float(parts.vae.config.scaling_factor)

    def _encode_prompt(self, prompt: str) -> Any:
        import torch

        tok = self.parts.tokenizer
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.parts.text_encoder(ids)[0].float()  # (1, 77, width)

    def settings(self) -> Mapping[str, object]:
        return {"steps": self.steps, "inversion_steps": self.inversion_steps,
                "eta": self.eta_name, "inversion_eta": self.options.inversion_eta,
                "prediction": self.prediction, "latent_norm": self.latent_norm,
                "dtype": self.options.dtype}

    def close(self) -> None:
        for net in (self.parts.unet, self.parts.vae, self.parts.text_encoder,
                    self.phikon.network):
            net.to("cpu")

    def encode(self, images: Any, noise: Any) -> tuple[Any, Any]:
        """(B, 3, H, W) in [0, 1] -> (sampled latent x scaling, posterior mode): the published
        script inverts a posterior sample and conditions on the mode."""
        import torch

        with torch.no_grad():
            dist = self.parts.vae.encode((images * 2 - 1).to(self.vae_dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        sample = mean + std * noise.draw(mean.shape[1:]).to(mean.device)
        return sample * self.scaling, mean

    @property
    def vae_dtype(self) -> Any:
        return next(self.parts.vae.parameters()).dtype

    def decode(self, latents: Any) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for part in latents.split(4):  # the decoder is the memory peak
                img = self.parts.vae.decode((part / self.scaling).to(self.vae_dtype),
                                            return_dict=False)[0].float()
                img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                out.append(img.permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()

    def invert(self, images: Any, noise: Any) -> tuple[Any, Any]:
        """(inverted noise latent, H&E latent) of (B, 3, H, W) images in [0, 1]."""
        from stainctl.engines.ddim import standardise
        from stainctl.engines.histdist.sampling import invert

        start, he = self.encode(images, noise)
        cond = self.prompt_embedding.expand(images.shape[0], -1, -1)
        x = invert(self.parts.unet, self.parts.inverse_scheduler, start, cond,
                   self.inversion_steps, self.inversion_eta, noise, self.dtype,
                   normalise_steps=self.latent_norm == "steps")
        if self.latent_norm == "inversion":
            x = standardise(x)
        return x, he

    def translate(self, tiles: np.ndarray, seeds: Sequence[int] | None = None) -> np.ndarray:
        import torch

        from stainctl.engines.ddim import TileNoise
        from stainctl.engines.histdist.sampling import denoise

        b, h, w, _ = tiles.shape
        if h != self.input_side or w != self.input_side:
            raise ModelError(f"{self.card.name} translates {self.input_side}-px tiles; got "
                             f"{w} x {h}")
        noise = TileNoise(list(range(b)) if seeds is None else [int(s) for s in seeds])
        images = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        images = images.permute(0, 3, 1, 2).float() / 255
        x, he = self.invert(images, noise)
        with torch.no_grad():
            tokens = self.phikon.encode(images, self.phikon_dtype).float()
        x = denoise(self.parts.unet, self.parts.scheduler, x, tokens, he, self.steps, self.eta,
                    noise, self.dtype)
        return self.decode(x)

    @property
    def phikon_dtype(self) -> Any:
        return next(self.phikon.network.parameters()).dtype


def model_folder(card: ModelCard, directory: Path) -> Path:
    """The folder holding the card's pipeline (where its unet weights were found)."""
    from stainctl.models.weights import resolve

    unet = card.weight("unet")
    path = resolve(card, "unet", directory)
    return path.parents[len(Path(unet.subfolder).parts)] if unet.subfolder else path.parent


def load_histdist_engine(card: ModelCard, directory: Path,
                         options: EngineOptions | None = None) -> HistDiSTEngine:
    import torch

    from stainctl.engines.histdist.phikon import load_phikon
    from stainctl.engines.precision import resolve_dtype
    from stainctl.models.encoders import resolve_device
    from stainctl.models.registry import get_card
    from stainctl.models.weights import resolve

    options = options or EngineOptions(device="cpu")
    device = resolve_device(options.device)
    resolve_dtype(options.dtype, torch.device(device))  # fp16 on a CPU: said before loading
    prediction = options.prediction or str(card.architecture.get("prediction",
                                                                 DEFAULTS["prediction"]))
    parts = load_folder(model_folder(card, directory), prediction, card.name)
    if not card.encoder:
        raise ModelError(f"model {card.name}: its card names no encoder (phikon)")
    encoder = get_card(card.encoder, directory)
    phikon = load_phikon(resolve(encoder, "model", directory).parent, device)
    return HistDiSTEngine(card, parts, phikon, options, device)
