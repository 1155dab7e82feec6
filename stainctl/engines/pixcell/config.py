"""What a PixCell model is built from: the transformer, VAE and scheduler configurations.

The defaults are the released PixCell-1024 (PixArt-Sigma-style, 28 layers, 16 heads x 72, patch 2,
16 latent channels in and 32 out, UNI2-h conditioning of 16 tokens x 1536), the SD3.5 VAE and the
DPM-Solver++ scheduler it was sampled with. A card's `[architecture]` tables override any field,
which is how tests build tiny networks of the same classes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stainctl.engines.base import DEFAULT_FIXED_OVERLAP
from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 16, "out_channels": 32,
    "num_layers": 28, "cross_attention_dim": 1152, "caption_channels": 1536,
    "caption_num_tokens": 16, "sample_size": 128, "patch_size": 2, "interpolation_scale": 2,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "num_embeds_ada_norm": 1000, "activation_fn": "gelu-approximate", "attention_bias": True,
    "use_additional_conditions": False,
}
# stabilityai/stable-diffusion-3.5-large, subfolder vae.
VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024,
    "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
# The PixArt-Sigma scheduler configuration PixCell-1024 ships.
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "algorithm_type": "dpmsolver++", "solver_order": 2,
    "solver_type": "midpoint", "prediction_type": "epsilon", "lower_order_final": True,
    "timestep_spacing": "linspace", "steps_offset": 0,
}
# Context px on each side of a generated tile, blended by stitch, unless a card or --overlap says.
DEFAULT_OVERLAP = DEFAULT_FIXED_OVERLAP
FLOW: dict[str, Any] = {"channels": 1536, "width": 1024, "time_dim": 1024, "bottleneck": 1024,
                        "blocks": 6}


@dataclass(frozen=True, kw_only=True)
class LatentScaling:
    """The VAE's latent normalisation: the transformer trains on and generates
    (z - shift) * scale, and the VAE decodes z = x / scale + shift (SD3.5: shift 0.0609, scale
    1.5305). The one definition for training and sampling."""

    scale: float
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ModelError(f"the VAE's scaling_factor must be positive, got {self.scale}")

    @classmethod
    def of(cls, vae_config: Any) -> LatentScaling:
        """From a VAE configuration (a dict, or a diffusers model's `.config`)."""
        get = vae_config.get if isinstance(vae_config, dict) else (
            lambda key, default=None: getattr(vae_config, key, default))
        return cls(scale=float(get("scaling_factor", 1.0) or 1.0),
                   shift=float(get("shift_factor", None) or 0.0))

    def normalise(self, z: Any) -> Any:
        """VAE latents -> what the transformer sees."""
        return (z - self.shift) * self.scale

    def denormalise(self, x: Any) -> Any:
        """What the transformer makes -> VAE latents to decode."""
        return x / self.scale + self.shift


@dataclass(frozen=True)
class PixCellConfig:
    transformer: dict[str, Any] = field(default_factory=lambda: dict(TRANSFORMER))
    vae: dict[str, Any] = field(default_factory=lambda: dict(VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    flow: dict[str, Any] = field(default_factory=lambda: dict(FLOW))
    flow_steps: int = 100  # Euler steps of the H&E -> IHC embedding flow

    @classmethod
    def from_card(cls, card: ModelCard) -> PixCellConfig:
        a = card.architecture
        unknown = set(a) - {"transformer", "vae", "scheduler", "flow", "flow_steps", "margin",
                            "base", "rank", "alpha", "flow_from"}
        if unknown:
            raise ModelError(f"{card.origin}: unknown [architecture] field(s) for the pixcell "
                             f"engine: {', '.join(sorted(unknown))}")
        return cls({**TRANSFORMER, **a.get("transformer", {})}, {**VAE, **a.get("vae", {})},
                   {**SCHEDULER, **a.get("scheduler", {})}, {**FLOW, **a.get("flow", {})},
                   int(a.get("flow_steps", 100)))

    @property
    def latents(self) -> LatentScaling:
        return LatentScaling.of(self.vae)

    @property
    def tokens(self) -> int:
        return int(self.transformer["caption_num_tokens"])

    @property
    def latent_channels(self) -> int:
        return int(self.transformer["in_channels"])

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel: 2 per VAE down block after the first."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def image_size(self) -> int:
        """The tile side the transformer was trained on, in pixels."""
        return int(self.transformer["sample_size"]) * self.downscale
