"""Tiny randomly initialised encoders of the real classes, saved as a user's model would be."""

from __future__ import annotations

from pathlib import Path

TINY_UNI2H = """
name = "{name}"
kind = "encoder"
engine = "timm"
input_mpp = {mpp}
tile_size = {tile_size}
licence = "test"
intended_use = "tests"
training_data = "none: random weights"

[architecture]
family = "crop-cls"
timm_model = "vit_giant_patch14_224"
crop = {crop}
input_size = 56
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[architecture.timm_kwargs]
img_size = 56
patch_size = 14
depth = {depth}
num_heads = 4
init_values = 1.0  # not 1e-5: random blocks must change the tokens
embed_dim = {embed_dim}
mlp_ratio = 5.33334
num_classes = 0
no_embed_class = true
mlp_layer = "SwiGLUPacked"
act_layer = "SiLU"
reg_tokens = 8
dynamic_img_size = true
{weights}
"""
HUB_WEIGHTS = """
[[weights]]
role = "encoder"
repo = "MahmoodLab/UNI2-h"
filename = "pytorch_model.bin"
"""


def tiny_encoder_text(name: str = "tiny-uni2h", *, mpp: float = 0.5, tile_size: int = 512,
                      crop: int = 256, depth: int = 2, embed_dim: int = 48,
                      weights: str = HUB_WEIGHTS) -> str:
    """A UNI2-h-shaped encoder card: the real timm class, tiny sizes."""
    return TINY_UNI2H.format(name=name, mpp=mpp, tile_size=tile_size, crop=crop, depth=depth,
                             embed_dim=embed_dim, weights=weights)


def tiny_card(folder: Path, name: str = "tiny-uni2h", depth: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(tiny_encoder_text(name, depth=depth))
    return path


def save_weights(card_path: Path, out: Path, seed: int = 0) -> Path:
    """Build the card's network with random weights and save them as a .bin state dict."""
    import torch

    from stainctl.models.card import load_card
    from stainctl.models.encoders import EncoderSpec, build_network

    torch.manual_seed(seed)
    net = build_network(EncoderSpec.from_card(load_card(card_path)))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    return out


def install_tiny(models_dir: Path, tmp: Path, name: str = "tiny-uni2h", depth: int = 2) -> Path:
    """A tiny UNI2-h-shaped encoder added to `models_dir` as `stainctl models add` does."""
    card = tiny_card(tmp / "cards", name, depth)
    target = models_dir / name
    save_weights(card, target / "pytorch_model.bin")
    (target / "card.toml").write_text(card.read_text())
    return target / "card.toml"


FAST_CARD = """
name = "{name}"
kind = "marker"
engine = "fast"
marker = "{marker}"
input_mpp = 0.5
tile_size = 512
licence = "test"
intended_use = "tests"
training_data = "none: random weights"

[architecture]
margin = 32

[[weights]]
role = "generator"
path = "generator.safetensors"
"""


def install_fast(models_dir: Path, name: str = "test-ki67", marker: str = "ki67",
                 seed: int = 0) -> Path:
    """A randomly initialised fast generator installed as a user's marker model."""
    import torch

    from stainctl.engines.fast.model import FastConfig, FastGenerator
    from stainctl.engines.fast.train import export

    torch.manual_seed(seed)
    gen = FastGenerator(FastConfig(markers=(marker,)))
    with torch.no_grad():  # give FiLM weights, so the output is not the input
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    target = models_dir / name
    target.mkdir(parents=True, exist_ok=True)
    export(gen, target / "generator.safetensors")
    (target / "card.toml").write_text(FAST_CARD.format(name=name, marker=marker))
    return target / "card.toml"
