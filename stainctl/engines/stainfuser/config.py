"""What a StainFuser model is built from: the configurations its authors publish
(R-J96/stainFuser, `src/configs/sd21b_*_config.json`: the Stable Diffusion 2.1-base UNet and VAE,
and the PNDM scheduler it samples with) and how the networks are put together
(`src/misc/model_utils.py:load_stainFuser`).

A card's `[architecture]` tables (`unet`, `vae`, `scheduler`, `conditioning_channels`) override
any field: tests build tiny networks of the same classes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stainctl.errors import ModelError
from stainctl.models.card import ModelCard

UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "only_cross_attention": False, "out_channels": 4,
    "resnet_time_scale_shift": "default", "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": True,
}
VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 768, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None,
}
# The ControlNet's conditioning embedding (the authors keep diffusers' default) takes the source
# image itself, RGB in [0, 1] at full resolution, and brings it down to the latent grid.
CONDITIONING_CHANNELS = (16, 32, 96, 256)
TILE = 512  # 512-px tiles at 0.5 µm/px, as the authors run it on slides
MARGIN = 32  # context px each side: neighbouring tiles overlap by 64 px, blended by stitch


@dataclass(frozen=True, kw_only=True)
class StainFuserConfig:
    unet: dict[str, Any] = field(default_factory=lambda: dict(UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(VAE))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    conditioning_channels: tuple[int, ...] = CONDITIONING_CHANNELS
    image_size: int = TILE

    def __post_init__(self) -> None:
        if self.unet["in_channels"] != self.vae["latent_channels"]:
            raise ModelError("the UNet's in_channels must equal the VAE's latent_channels")
        if self.image_size % self.downscale:
            raise ModelError(f"tile size {self.image_size} is not a multiple of the VAE's "
                             f"{self.downscale}x downscaling")

    @property
    def downscale(self) -> int:
        return int(2 ** (len(self.vae["block_out_channels"]) - 1))

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @classmethod
    def from_card(cls, card: ModelCard) -> StainFuserConfig:
        arch = card.architecture
        try:
            return cls(unet={**UNET, **arch.get("unet", {})}, vae={**VAE, **arch.get("vae", {})},
                       scheduler={**SCHEDULER, **arch.get("scheduler", {})},
                       conditioning_channels=tuple(arch.get("conditioning_channels",
                                                            CONDITIONING_CHANNELS)),
                       image_size=int(card.tile_size))
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"model {card.name}: bad [architecture] ({err})") from None
