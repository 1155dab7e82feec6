"""The PixCell transformer: diffusers' PixArt transformer conditioned on UNI2-h tokens.

Two things differ from PixArt, and both are buffers of the released checkpoint:
  * `y_pos_embed.y_pos_embed`: a fixed 2-D sin-cos position embedding of the token grid (4 x 4 for
    PixCell-1024), added to the UNI2-h tokens before the caption projection, so the model knows
    which crop each token describes;
  * `caption_projection.uncond_embedding` (tokens x 1536): the "no condition" input of
    classifier-free guidance, a fixed random buffer drawn once when PixCell was built and stored
    with the weights; it is never trained (here it is loaded from the checkpoint, and train-lora
    swaps it in for a share of the conditions without changing it).
Importing this module imports diffusers; callers import it lazily.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(positions.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def token_grid_embedding(dim: int, tokens: int, base_size: int,
                         interpolation_scale: float = 2.0) -> torch.Tensor:
    """(tokens, dim) position embedding of a square token grid, row by row, as PixCell builds
    it: grid coordinates stretched to `base_size` (latent patches a side), divided by the
    interpolation scale and shifted by base_size // tokens."""
    side = round(tokens**0.5)
    if side * side != tokens or dim % 4:
        raise ValueError(f"{tokens} tokens are not a square grid, or {dim} is not a multiple of 4")
    coords = torch.arange(side, dtype=torch.float32) / (side / base_size) / interpolation_scale
    coords = coords.double() + base_size // tokens
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # The first half of the channels encodes the column, the second the row.
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class TokenPositions(nn.Module):
    def __init__(self, dim: int, tokens: int, base_size: int, interpolation_scale: float) -> None:
        super().__init__()
        self.register_buffer("y_pos_embed",
                             token_grid_embedding(dim, tokens, base_size,
                                                  interpolation_scale).unsqueeze(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens + self.get_buffer("y_pos_embed")).to(tokens.dtype)


class PixCellTransformer2DModel(PixArtTransformer2DModel):
    """PixArt with PixCell's token positions and stored unconditional embedding."""

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72,
                 in_channels: int = 16, out_channels: int | None = 32, num_layers: int = 28,
                 dropout: float = 0.0, norm_num_groups: int = 32,
                 cross_attention_dim: int | None = 1152, attention_bias: bool = True,
                 sample_size: int = 128, patch_size: int = 2,
                 activation_fn: str = "gelu-approximate", num_embeds_ada_norm: int | None = 1000,
                 upcast_attention: bool = False, norm_type: str = "ada_norm_single",
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale: int | None = 2,
                 use_additional_conditions: bool | None = False,
                 caption_channels: int | None = 1536, caption_num_tokens: int = 16,
                 attention_type: str | None = "default") -> None:
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            dropout=dropout, norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim, attention_bias=attention_bias,
            sample_size=sample_size, patch_size=patch_size, activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm, upcast_attention=upcast_attention,
            norm_type=norm_type, norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps, interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels, attention_type=attention_type)
        if caption_channels is None or self.caption_projection is None:
            raise ValueError("PixCell is conditioned on embeddings: caption_channels is needed")
        self.caption_projection.register_buffer(
            "uncond_embedding", torch.randn(caption_num_tokens, caption_channels)
            / caption_channels**0.5)
        self.y_pos_embed = (TokenPositions(caption_channels, caption_num_tokens,
                                           sample_size // patch_size, 2.0)
                            if caption_num_tokens > 1 else None)

    @property
    def uncond_embedding(self) -> torch.Tensor:
        return self.get_buffer("caption_projection.uncond_embedding")

    def forward(self, hidden_states: torch.Tensor,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        if self.y_pos_embed is not None:
            encoder_hidden_states = self.y_pos_embed(encoder_hidden_states)
        # PixArt reads these even without additional conditions (docs/NOTES.md).
        kwargs.setdefault("added_cond_kwargs", {"resolution": None, "aspect_ratio": None})
        return super().forward(hidden_states, encoder_hidden_states=encoder_hidden_states,
                               timestep=timestep, **kwargs)
