"""A HistDiST model folder: the diffusers InstructPix2Pix pipeline layout its authors release.

unet/ (Stable Diffusion 1.5 UNet with 8 input channels: the noisy latent and the H&E latent),
vae/, text_encoder/ and tokenizer/ (CLIP, for the "H&E" prompt of the inversion) and scheduler/.
Each part is checked before anything loads, so a folder with a part missing gives one message
naming that part instead of a library's traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError

# part -> (files it must have, files of which it must have one)
PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unet": (("config.json",),
             ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "vae": (("config.json",),
            ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "text_encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "tokenizer": (("vocab.json", "merges.txt"), ()),
    "scheduler": (("scheduler_config.json",), ()),
}


def missing_parts(folder: Path) -> list[str]:
    """What `folder` lacks of a HistDiST model folder, as `part/file` names."""
    missing = []
    for part, (needed, one_of) in PARTS.items():
        where = folder / part
        if not where.is_dir():
            missing.append(f"{part}/")
            continue
        missing += [f"{part}/{f}" for f in needed if not (where / f).is_file()]
        if one_of and not any((where / f).is_file() for f in one_of):
            missing.append(f"{part}/{' or '.join(one_of)}")
    return missing


def check_folder(folder: Path, model: str = "") -> None:
    what = f"model {model}: " if model else ""
    if not folder.is_dir():
        raise ModelError(f"{what}{folder} is not a folder; a HistDiST model is a diffusers "
                         f"pipeline folder with {', '.join(PARTS)}")
    missing = missing_parts(folder)
    if missing:
        raise ModelError(f"{what}the HistDiST model folder {folder} lacks {', '.join(missing)}; "
                         "unpack the authors' whole model folder (see `stainctl models show "
                         f"{model or 'histdist-ki67'}`)")


def scheduler_settings(prediction: str) -> dict[str, Any]:
    """What the published script overrides in the folder's scheduler configuration."""
    if prediction == "v_prediction":  # HistDiST: v-prediction on zero-terminal-SNR betas
        return {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                "rescale_betas_zero_snr": True}
    if prediction == "epsilon":
        return {"prediction_type": "epsilon"}
    raise ModelError(f"prediction type must be v_prediction or epsilon, got {prediction!r}")


@dataclass
class PipelineParts:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    inverse_scheduler: Any  # DDIMInverseScheduler: timesteps and alphas of the inversion
    scheduler: Any  # DDIMScheduler: the translation


def load_folder(folder: Path, prediction: str, model: str = "") -> PipelineParts:
    from stainctl.models.torch_compat import prepare_torchvision

    check_folder(folder, model)
    prepare_torchvision()  # transformers imports torchvision when it is installed
    try:
        from diffusers import (
            AutoencoderKL,
            DDIMInverseScheduler,
            DDIMScheduler,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # stainctl shows its own progress
    except ImportError as err:
        raise ModelError("the histdist engine needs diffusers and transformers: pip install -c "
                         f"constraints.txt 'stainctl[pixcell]' ({err})") from None
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"model {model}: {folder} could not be loaded as a HistDiST model "
                         f"folder ({str(err).splitlines()[0]})") from None
    if unet.config.in_channels != 2 * unet.config.out_channels:
        raise ModelError(f"model {model}: {folder}/unet takes {unet.config.in_channels} "
                         "channels; a HistDiST UNet takes the noisy latent and the H&E latent "
                         f"({2 * unet.config.out_channels})")
    settings = scheduler_settings(prediction)
    inverse = DDIMInverseScheduler.from_pretrained(folder, subfolder="scheduler", **settings)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **settings)
    return PipelineParts(unet, vae, text_encoder, tokenizer, inverse, scheduler)
