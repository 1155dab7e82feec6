"""Tiny randomly initialised PixCell models of the real classes, laid out like the released files.

The transformer and VAE are saved as diffusers safetensors; the LoRA as a released checkpoint is
(a full state dict of a transformer with a peft adapter injected, wrapped as a training
checkpoint, in a .pth); the flow MLP as a plain .pth state dict. Tiles are 256 px at 2 µm/px, so
the CMU-1 sample gives a handful of tiles.
"""

from __future__ import annotations

from pathlib import Path

from models_helpers import tiny_encoder_text

# A tiny UNI2-h with 64-px crops: a 256-px tile gives the 4 x 4 tokens PixCell takes.
ENCODER = dict(crop=64, tile_size=256, depth=1, embed_dim=32,
               weights='\n[[weights]]\nrole = "encoder"\npath = "encoder.bin"\n')


ARCHITECTURE = """
[architecture]
margin = 32
flow_steps = 10
[architecture.transformer]
num_attention_heads = 2
attention_head_dim = 8
in_channels = 4
out_channels = 8
num_layers = 2
cross_attention_dim = 16
caption_channels = 32
caption_num_tokens = 16
sample_size = 32
[architecture.vae]
latent_channels = 4
block_out_channels = [8, 8, 8, 8]
layers_per_block = 1
norm_num_groups = 4
sample_size = 256
[architecture.flow]
channels = 32
width = 16
time_dim = 16
bottleneck = 16
blocks = 2
"""

MARKER = """
name = "{name}"
kind = "{kind}"
engine = "pixcell"
marker = "{marker}"
encoder = "tiny-uni64"
input_mpp = {mpp}
tile_size = 256
licence = "test"
intended_use = "tests"
training_data = "none: random weights"
""" + ARCHITECTURE


def _weights(*roles: tuple[str, str]) -> str:
    return "".join(f'\n[[weights]]\nrole = "{r}"\npath = "{p}"\n' for r, p in roles)


def install_encoder(models: Path, mpp: float = 2.0) -> None:
    import torch

    from stainctl.models.card import card_from_dict
    from stainctl.models.encoders import EncoderSpec, build_network

    target = models / "tiny-uni64"
    target.mkdir(parents=True, exist_ok=True)
    text = tiny_encoder_text("tiny-uni64", mpp=mpp, **ENCODER)
    (target / "card.toml").write_text(text)
    import tomllib

    torch.manual_seed(0)
    net = build_network(EncoderSpec.from_card(card_from_dict(tomllib.loads(text))))
    torch.save(net.state_dict(), target / "encoder.bin")


def tiny_parts(seed: int = 0):
    """A tiny transformer, VAE and flow MLP with random (non-zero) weights."""
    import tomllib

    import torch

    from stainctl.engines.pixcell.config import PixCellConfig
    from stainctl.engines.pixcell.engine import build_transformer, build_vae
    from stainctl.engines.pixcell.flow import FlowMLP
    from stainctl.models.card import card_from_dict

    card = card_from_dict(tomllib.loads(MARKER.format(name="x", kind="base", marker="",
                                                      mpp=2.0)))
    config = PixCellConfig.from_card(card)
    torch.manual_seed(seed)
    transformer = build_transformer(config)
    vae = build_vae(config)
    flow = FlowMLP(**config.flow)
    with torch.no_grad():  # zero-initialised outputs would make every network the identity
        for net in (transformer, flow):
            for name, p in net.named_parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02 if "flow" not in name else 0.05)
    return config, transformer, vae, flow


def released_lora(transformer, path: Path, rank: int = 4, seed: int = 1) -> Path:
    """A checkpoint laid out like the released per-marker LoRA files."""
    import copy

    import torch
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                   target_modules=["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]),
        copy.deepcopy(transformer))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3, "step": 120}, path)
    return path


def install_pixcell(models: Path, name: str = "tiny-pixcell-ki67", marker: str = "ki67",
                    with_lora: bool = True, with_flow: bool = True, mpp: float = 2.0) -> Path:
    """The tiny base model (`tiny-pixcell`) and a marker model on it, as the released cards:
    transformer + VAE safetensors, LoRA .pth, flow MLP .pth."""
    import torch
    from safetensors.torch import save_file

    install_encoder(models, mpp)
    _, transformer, vae, flow = tiny_parts()
    base = models / "tiny-pixcell"
    base.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()},
              str(base / "transformer.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(base / "vae.safetensors"))
    (base / "card.toml").write_text(
        MARKER.format(name="tiny-pixcell", kind="base", marker="", mpp=mpp)
        + _weights(("transformer", "transformer.safetensors"), ("vae", "vae.safetensors")))
    target = models / name
    target.mkdir(parents=True, exist_ok=True)
    roles = [("transformer", "../tiny-pixcell/transformer.safetensors"),
             ("vae", "../tiny-pixcell/vae.safetensors")]
    if with_lora:
        released_lora(transformer, target / "lora.pth")
        roles.append(("lora", "lora.pth"))
    if with_flow:
        torch.save(flow.state_dict(), target / "mlp.pth")
        roles.append(("flow_mlp", "mlp.pth"))
    (target / "card.toml").write_text(
        MARKER.format(name=name, kind="marker", marker=marker, mpp=mpp) + _weights(*roles))
    return target / "card.toml"


def tiny_engine(models: Path, steps: int = 3, name: str = "tiny-pixcell-ki67",  # type: ignore[no-untyped-def]
                **sampling: object):
    """An installed tiny pixcell model (`install_pixcell`) loaded on the CPU at `steps`."""
    from stainctl.engines.base import EngineOptions
    from stainctl.engines.pixcell.engine import load_pixcell_engine
    from stainctl.models.registry import get_card

    options = EngineOptions(**{"device": "cpu", "steps": steps, **sampling})  # type: ignore[arg-type]
    return load_pixcell_engine(get_card(name, models), models, options)


def cmu1_tiles(n: int = 2, side: int = 256):  # type: ignore[no-untyped-def]
    """`n` real H&E tiles of `side` px from the CMU-1 sample, each shifted a little."""
    import cv2
    import numpy as np
    import openslide
    from conftest import CMU1

    region = openslide.OpenSlide(CMU1).read_region((600, 900), 0, (side * 4, side * 4))
    small = cv2.resize(np.asarray(region)[..., :3], (side, side), interpolation=cv2.INTER_AREA)
    return np.stack([np.roll(small, 16 * i, axis=1) for i in range(n)])
