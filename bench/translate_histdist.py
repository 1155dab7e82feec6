"""Benchmark: the histdist engine at full size (Stable Diffusion 1.5 UNet with 8 input channels,
the SD VAE, a ViT-B/16 as Phikon, the CLIP ViT-L text encoder), with random weights: speed does
not depend on their values. 512-px tiles, the published 100 inversion + 100 translation steps
and fewer.

    python bench/translate_histdist.py                  # CPU: one tile, timed per part
    python bench/translate_histdist.py --device cuda    # GPU: batched bf16, tiles/s, memory,
                                                        # and pixcell --structure vs plain

On the CPU a full-size UNet pass at 512 px takes seconds, so one tile is run with a few steps of
each loop (`--steps 2`), every part is timed apart (VAE encode, Phikon, one inversion step, one
translation step, VAE decode) and 100+100, 50+50, 25+25 and 10+10 are extrapolated from them
(the loops are the same pass repeated). On a GPU the whole engine is timed on a batch for each
step count, and, with random full-size PixCell-1024 weights at 1024 px, the sampler with
`--structure 0.5` next to plain sampling (20 steps, guidance 1.2). Results are printed and
appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import add_to_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Stable Diffusion 1.5's UNet with InstructPix2Pix's 8 input channels, and its VAE.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "steps_offset": 1}


def build(device: str, dtype_name: str) -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMInverseScheduler,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTModel

    from stainctl.engines.base import EngineOptions
    from stainctl.engines.histdist.engine import HistDiSTEngine
    from stainctl.engines.histdist.folder import PipelineParts, scheduler_settings
    from stainctl.engines.histdist.phikon import Phikon
    from stainctl.models.card import ModelCard

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds, not minutes
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, vocab_size=49408))
        phikon = ViTModel(ViTConfig(), add_pooling_layer=False)  # ViT-B/16 at 224 px
    settings = scheduler_settings("v_prediction")
    parts = PipelineParts(unet, vae, text, _Tokenizer(),
                          DDIMInverseScheduler.from_config(SD15_SCHEDULER, **settings),
                          DDIMScheduler.from_config(SD15_SCHEDULER, **settings))
    processor = {"size": 224, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225]}
    card = ModelCard(name="bench-histdist", kind="marker", engine="histdist", input_mpp=0.5,
                     tile_size=512, licence="", intended_use="", training_data="",
                     marker="ki67", encoder="phikon")
    options = EngineOptions(device=device, dtype=dtype_name)
    return HistDiSTEngine(card, parts, Phikon(phikon, processor, device), options, device)


class _Tokenizer:
    """The prompt's token ids (CLIP's tokenizer files are not needed to time the network)."""

    model_max_length = 77

    def __call__(self, prompt: str, **_: Any) -> Any:
        import torch

        ids = torch.full((1, 77), 49407)
        ids[0, :3] = torch.tensor([49406, 256, 49407])

        class Out:
            input_ids = ids

        return Out()


def tiles(n: int) -> np.ndarray:
    import openslide

    from bench._common import SAMPLE

    region = np.asarray(openslide.OpenSlide(str(SAMPLE)).read_region((600, 800), 0, (1024, 512))
                        .convert("RGB"))
    return np.stack([np.roll(region[:, :512], 64 * i, axis=1) for i in range(n)])


def timed(fn: Any) -> tuple[float, Any]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from stainctl.engines.ddim import TileNoise, eta_schedule
    from stainctl.engines.histdist.sampling import denoise, invert

    t_build, engine = timed(lambda: build("cpu", "fp32"))
    tile = tiles(1)
    x = torch.from_numpy(tile).permute(0, 3, 1, 2).float() / 255
    noise = TileNoise([0])
    with torch.no_grad():
        t_enc, (start, he) = timed(lambda: engine.encode(x, noise))
        t_phikon, tokens = timed(lambda: engine.phikon.encode(x).float())
    n = args.steps
    cond = engine.prompt_embedding
    t_inv, inv = timed(lambda: invert(engine.parts.unet, engine.parts.inverse_scheduler, start,
                                      cond, n, eta_schedule("zero"), noise, torch.float32))
    t_tr, lat = timed(lambda: denoise(engine.parts.unet, engine.parts.scheduler, inv, tokens, he,
                                      n, eta_schedule("cosine-20"), noise, torch.float32))
    t_dec, _ = timed(lambda: engine.decode(lat))
    per_inv, per_tr = t_inv / n, t_tr / n
    fixed = t_enc + t_phikon + t_dec
    return {"mode": "cpu", "steps_run": n, "build_s": t_build, "vae_encode_s": t_enc,
            "phikon_s": t_phikon, "inversion_step_s": per_inv, "translation_step_s": per_tr,
            "vae_decode_s": t_dec,
            "s_per_tile": {f"{k}+{k}": fixed + k * (per_inv + per_tr)
                           for k in (100, 50, 25, 10)}}


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"mode": "cuda", "device": torch.cuda.get_device_name(),
                           "batch": args.batch, "dtype": "bf16"}
    engine = build("cuda", "bf16")
    batch = tiles(args.batch)
    seeds = list(range(args.batch))
    runs = {}
    for k in (2, 100, 25, 10):  # the first is the warm-up
        engine.steps = engine.inversion_steps = k
        torch.cuda.reset_peak_memory_stats()
        t, _ = timed(lambda: engine.translate(batch, seeds))
        if k != 2:
            runs[f"{k}+{k}"] = {"s_per_batch": t, "tiles_per_s": args.batch / t,
                                "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    out["histdist"] = runs
    engine.close()  # its networks back to the CPU: the GPU is free for PixCell
    torch.cuda.empty_cache()
    out["pixcell"] = pixcell_structure(args.pixcell_batch)
    return out


def pixcell_structure(batch: int) -> dict[str, Any]:
    """Plain PixCell sampling against --structure 0.5 (sampler only: random tokens stand in
    for UNI2-h's, no decode), full-size transformer, 1024 px, 20 steps, guidance 1.2, bf16."""
    import torch

    from stainctl.engines.ddim import eta_schedule
    from stainctl.engines.pixcell.config import PixCellConfig
    from stainctl.engines.pixcell.engine import build_transformer
    from stainctl.engines.pixcell.sampling import invert_and_sample, sample_latents

    config = PixCellConfig()
    torch.manual_seed(0)
    with torch.device("cuda"):
        tr = build_transformer(config).eval().requires_grad_(False).to(torch.bfloat16)
    side = config.image_size // config.downscale
    cond = torch.randn(batch, config.tokens, 1536, device="cuda")
    uncond = torch.randn(config.tokens, 1536, device="cuda")
    x = torch.randn(batch, config.latent_channels, side, side, device="cuda")
    seeds = list(range(batch))

    def plain() -> Any:
        return sample_latents(tr, config.scheduler, cond, uncond, x, 20, 1.2, torch.bfloat16)

    def structured(s: float) -> Any:
        return invert_and_sample(tr, config.scheduler, cond, cond, uncond, x, 20, s, 1.2,
                                 torch.bfloat16, eta_schedule("zero"), seeds)

    timed(lambda: sample_latents(tr, config.scheduler, cond, uncond, x, 2, 1.2,
                                 torch.bfloat16))  # warm-up
    t_plain, _ = timed(plain)
    t_half, _ = timed(lambda: structured(0.5))
    t_full, _ = timed(lambda: structured(0.99))
    return {"batch": batch, "plain_20_s": t_plain, "structure_0.5_s": t_half,
            "structure_0.99_s": t_full, "tiles_per_s_plain": batch / t_plain,
            "tiles_per_s_structure_0.5": batch / t_half}


def record(result: dict[str, Any], command: str) -> None:
    import torch

    lines = [f"\n### `{command}` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{result.get('device') or platform.processor() or platform.machine()})\n"]
    if result["mode"] == "cpu":
        lines.append(f"One 512-px tile, fp32, {result['steps_run']}+{result['steps_run']} steps "
                     "run, each part timed; s/tile extrapolated per step:\n")
        lines.append("| part | seconds |\n|---|---|")
        for key in ("vae_encode_s", "phikon_s", "inversion_step_s", "translation_step_s",
                    "vae_decode_s"):
            lines.append(f"| {key} | {result[key]:.2f} |")
        lines.append("\n| inversion + translation steps | s/tile (extrapolated) |\n|---|---|")
        for k, v in result["s_per_tile"].items():
            lines.append(f"| {k} | {v:.0f} |")
    else:
        lines.append(f"histdist, batch {result['batch']} of 512-px tiles, bf16:\n")
        lines.append("| steps | s/batch | tiles/s | peak GPU memory GiB |\n|---|---|---|---|")
        for k, v in result["histdist"].items():
            lines.append(f"| {k} | {v['s_per_batch']:.2f} | {v['tiles_per_s']:.2f} | "
                         f"{v['peak_gib']:.1f} |")
        p = result["pixcell"]
        lines.append(f"\npixcell sampler, batch {p['batch']} of 1024-px tiles, 20 steps, "
                     "guidance 1.2, bf16 (no UNI2-h, no decode):\n")
        lines.append("| run | seconds | tiles/s |\n|---|---|---|")
        lines.append(f"| plain | {p['plain_20_s']:.2f} | {p['tiles_per_s_plain']:.2f} |")
        lines.append(f"| --structure 0.5 | {p['structure_0.5_s']:.2f} | "
                     f"{p['tiles_per_s_structure_0.5']:.2f} |")
        lines.append(f"| --structure 0.99 | {p['structure_0.99_s']:.2f} | "
                     f"{p['batch'] / p['structure_0.99_s']:.2f} |")
    add_to_results("translate with the histdist engine (issue 18)", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=2, help="CPU: steps of each loop run")
    parser.add_argument("--batch", type=int, default=8, help="GPU: histdist tiles per batch")
    parser.add_argument("--pixcell-batch", type=int, default=4)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    result = cpu(args) if args.device == "cpu" else gpu(args)
    print(json.dumps(result, indent=1))
    if not args.no_record:
        record(result, "python " + " ".join(["bench/translate_histdist.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
