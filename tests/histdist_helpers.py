"""Tiny randomly initialised HistDiST model folders of the real classes, laid out as the authors
release them (a diffusers InstructPix2Pix pipeline folder), and a tiny ViT standing in for Phikon.

Tiles are 128 px at 2 µm/px with a 16-px margin, so the CMU-1 sample gives a handful of tiles.
"""

from __future__ import annotations

import json
from pathlib import Path

# Stable Diffusion 1.5's scheduler configuration, which HistDiST's folders carry.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
WIDTH = 32  # cross-attention width: the CLIP text model's and the Phikon stand-in's


def tiny_unet(seed: int = 0, scale: float = 1.0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=WIDTH,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with torch.no_grad():  # zero-initialised output layers would make every prediction zero
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
            if scale != 1.0:
                p.mul_(scale)
    return unet


def tiny_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         norm_num_groups=4, sample_size=128,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4)


def tiny_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary without merges: every character is a token."""
    # GPT-2's byte -> printable character table, which CLIP's BPE works on.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=WIDTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))


def tiny_phikon(seed: int = 0):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return ViTModel(ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=37, image_size=32, patch_size=8),
                    add_pooling_layer=False)


def write_folder(folder: Path, seed: int = 0, skip: str = "", unet_scale: float = 1.0) -> Path:
    """A HistDiST model folder of tiny networks; `skip`: a part to leave out."""
    parts = {"unet": lambda: tiny_unet(seed, unet_scale), "vae": lambda: tiny_vae(seed)}
    for part, build in parts.items():
        if part != skip:
            build().save_pretrained(folder / part)
    if skip != "tokenizer":
        tiny_tokenizer(folder / "tokenizer")
    if skip != "text_encoder":
        vocab = 2 * 256 + 2
        tiny_text_encoder(vocab, seed).save_pretrained(folder / "text_encoder")
    if skip != "scheduler":
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    return folder


PHIKON_CARD = """
name = "tiny-phikon"
kind = "encoder"
engine = "transformers"
input_mpp = 2.0
tile_size = 32
licence = "test"
intended_use = "tests"
training_data = "none: random weights"

[[weights]]
role = "config"
path = "config.json"

[[weights]]
role = "model"
path = "model.safetensors"
"""

HISTDIST_CARD = """
name = "{name}"
kind = "marker"
engine = "histdist"
marker = "{marker}"
encoder = "tiny-phikon"
input_mpp = 2.0
tile_size = 128
licence = "test"
intended_use = "tests"
training_data = "none: random weights"

[architecture]
margin = 16
""" + "".join(f"""
[[weights]]
role = "{role}"
subfolder = "{role}"
filename = "{name}"
url = "https://example.org/histdist"
""" for role, name in [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "config.json"),
                       ("text_encoder", "config.json"), ("tokenizer", "vocab.json"),
                       ("scheduler", "scheduler_config.json")])


def install_phikon(models: Path) -> None:
    target = models / "tiny-phikon"
    tiny_phikon().save_pretrained(target)
    (target / "preprocessor_config.json").write_text(json.dumps(
        {"size": 32, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    (target / "card.toml").write_text(PHIKON_CARD)


def install_histdist(models: Path, name: str = "tiny-histdist-ki67",
                     marker: str = "ki67") -> Path:
    install_phikon(models)
    target = write_folder(models / name)
    (target / "card.toml").write_text(HISTDIST_CARD.format(name=name, marker=marker))
    return target / "card.toml"
