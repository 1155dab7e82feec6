"""The histdist engine with tiny random networks of the real classes (an 8-channel
UNet2DConditionModel, a small AutoencoderKL, a tiny CLIP text model, a tiny ViT as Phikon)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from histdist_helpers import install_histdist, write_folder

from stainctl.engines.ddim import TileNoise, eta_at, eta_schedule
from stainctl.errors import ModelError


@pytest.fixture
def models(use_models):
    return use_models(install_histdist)


def _engine(models: Path, **options):
    from stainctl.engines.base import EngineOptions
    from stainctl.engines.histdist.engine import load_histdist_engine
    from stainctl.models.registry import get_card

    return load_histdist_engine(get_card("tiny-histdist-ki67", models), models, EngineOptions(
        **{"device": "cpu", "steps": 3, "inversion_steps": 3, **options}))


def _tiles(n: int = 3) -> np.ndarray:
    import openslide
    from conftest import CMU1

    region = np.asarray(openslide.OpenSlide(CMU1).read_region((800, 900), 0, (512, 512)))
    small = region[::4, ::4, :3]  # 128 px at about 2 µm/px
    return np.stack([np.roll(small, 16 * i, axis=1) for i in range(n)])


def test_scheduler_settings_are_the_published_ones(tmp_path):
    from stainctl.engines.histdist.folder import load_folder

    parts = load_folder(write_folder(tmp_path / "m"), "v_prediction")
    for s in (parts.scheduler, parts.inverse_scheduler):
        assert s.config.prediction_type == "v_prediction"
        assert s.config.timestep_spacing == "trailing"
        assert s.config.rescale_betas_zero_snr
        assert float(s.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR: pure noise at t = 999
    parts.scheduler.set_timesteps(100)
    parts.inverse_scheduler.set_timesteps(100)
    assert parts.scheduler.timesteps[0] == 999 and parts.scheduler.timesteps[-1] == 9
    assert list(parts.inverse_scheduler.timesteps) == list(parts.scheduler.timesteps)[::-1]
    eps = load_folder(write_folder(tmp_path / "e"), "epsilon").scheduler
    assert eps.config.prediction_type == "epsilon" and not eps.config.rescale_betas_zero_snr


def test_eta_schedules_are_the_published_ones():
    cosine = eta_schedule("cosine-20")
    assert eta_at(cosine, 0, 100) == pytest.approx(0.2)
    assert eta_at(cosine, 99, 100) == pytest.approx(1.0)
    assert eta_at(cosine, 50, 101) == pytest.approx(0.6)
    assert eta_at(eta_schedule("zero"), 10, 100) == 0
    assert eta_at(eta_schedule("0.3"), 10, 100) == pytest.approx(0.3)
    assert math.isclose(eta_at(eta_schedule("cosine-10"), 0, 2), 0.1)
    from stainctl.errors import UsageError

    with pytest.raises(UsageError, match="η schedule"):
        eta_schedule("sine")


def test_inversion_then_eta_zero_regeneration_gives_back_the_start(tmp_path):
    """The property that makes inversion preserve structure: DDIM run backwards then forwards
    under the same condition (no normalisation) returns the starting latent."""
    from stainctl.engines.histdist.folder import load_folder
    from stainctl.engines.histdist.sampling import denoise, invert

    parts = load_folder(write_folder(tmp_path / "m"), "v_prediction")
    torch.manual_seed(0)
    start = torch.randn(2, 4, 16, 16)
    cond = torch.randn(1, 77, 32).expand(2, -1, -1)
    zero, image = eta_schedule("zero"), torch.zeros_like(start)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    noise = invert(parts.unet, parts.inverse_scheduler, start, cond, 50, zero, TileNoise([1, 2]),
                   torch.float32)
    assert rel(noise, start) > 0.3  # the inversion went somewhere
    back = denoise(parts.unet, parts.scheduler, noise, cond, image, 50, zero, TileNoise([1, 2]),
                   torch.float32)
    assert rel(back, start) < 0.1
    fresh = denoise(parts.unet, parts.scheduler, torch.randn_like(start), cond, image, 50, zero,
                    TileNoise([1, 2]), torch.float32)
    assert rel(fresh, start) > 5 * rel(back, start)  # the inverted noise carries the latent


def test_batched_translation_is_deterministic_per_tile_seed(models):
    engine = _engine(models)
    tiles = _tiles(3)
    out = engine.translate(tiles, [5, 6, 7])
    assert out.shape == tiles.shape and out.dtype == np.uint8
    again = engine.translate(tiles, [5, 6, 7])
    assert np.array_equal(out, again)
    alone = engine.translate(tiles[1:2], [6])  # the same tile and seed in another batch
    assert np.abs(alone[0].astype(int) - out[1]).max() <= 2
    other = engine.translate(tiles[1:2], [8])
    assert np.abs(other[0].astype(int) - out[1]).mean() > 1  # the η noise follows the seed
    assert engine.settings()["steps"] == 3 and engine.settings()["eta"] == "cosine-20"


def test_defaults_are_published_and_options_reach_the_engine(models):
    from stainctl.engines.histdist.engine import DEFAULTS, HistDiSTEngine

    engine = _engine(models, steps=None, inversion_steps=None)
    assert isinstance(engine, HistDiSTEngine)
    assert (engine.steps, engine.inversion_steps) == (100, 100)
    assert engine.settings()["prediction"] == "v_prediction"
    assert DEFAULTS["latent_norm"] == "inversion" and engine.input_side == 128
    eps = _engine(models, prediction="epsilon", latent_norm="none", eta="zero")
    s = eps.settings()
    assert (s["prediction"], s["latent_norm"], s["eta"]) == ("epsilon", "none", "zero")
    # Phikon's image processor configuration is read from its folder.
    assert (engine.phikon.size, engine.phikon.mode) == (32, "bicubic")
    tokens = engine.phikon.encode_uint8(_tiles(1))
    assert tokens.shape == (1, 1 + (32 // 8) ** 2, 32)


def test_a_folder_with_a_missing_part_is_one_message_naming_it(tmp_path, cli, use_models):
    from stainctl.engines.histdist.folder import check_folder, load_folder

    folder = write_folder(tmp_path / "er", skip="vae")
    with pytest.raises(ModelError, match=r"lacks vae/;") as err:
        load_folder(folder, "v_prediction", "histdist-er")
    assert "\n" not in str(err.value)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"lacks unet/diffusion_pytorch_model.safetensors or "
                                         r"diffusion_pytorch_model.bin, vae/"):
        check_folder(folder)
    models = use_models()
    r = cli("models", "add", folder, "--for", "histdist-er")
    assert r.exit_code == 2 and "lacks unet/" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (models / "histdist-er").exists()


def test_models_add_a_folder_installs_a_released_model(tmp_path, cli, use_models):
    models = use_models()
    r = cli("models", "show", "histdist-er", "--json")
    files = json.loads(r.stdout)["files"]
    assert {f["role"] for f in files} == {"unet", "vae", "text_encoder", "tokenizer",
                                          "scheduler"}
    assert all(f["path"] is None for f in files)
    folder = write_folder(tmp_path / "downloaded" / "er_model")
    r = cli("models", "add", folder, "--for", "histdist-er")
    assert r.exit_code == 0, r.output
    assert (models / "histdist-er" / "unet" / "config.json").is_file()
    files = json.loads(cli("models", "show", "histdist-er", "--json").stdout)["files"]
    assert all(f["path"] and f["where"] == "models dir" for f in files)
    r = cli("models", "add", folder)  # a folder that holds no card must say which model it is
    assert r.exit_code == 2 and "--for histdist-er" in r.stderr


def test_missing_weights_say_where_the_authors_publish_them(cli, tmp_path, use_models,
                                                            cmu1_path):
    use_models()
    r = cli("translate", cmu1_path, "--marker", "histdist-ki67", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "drive.google.com" in r.stderr and "models add FOLDER --for histdist-ki67" in r.stderr
    assert not (tmp_path / "out" / "workspace").exists()


@pytest.mark.slow
def test_main_job_with_a_tiny_histdist_model_writes_the_ome_tiff(cli, tmp_path, models,
                                                                 cmu1_path):
    import tiffslide

    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "tiny-histdist-ki67", "-o", out, "--steps", 2,
            "--inversion-steps", 2, "--json")
    assert r.exit_code == 0, r.output
    details = json.loads(r.stdout)["slides"][0]["details"]
    path = Path(details["output"])
    assert path.name == "CMU-1-Small-Region.tiny-histdist-ki67.ome.tiff"
    slide = tiffslide.TiffSlide(path)
    assert slide.dimensions == (round(2220 * 0.499 / 2), round(2967 * 0.499 / 2))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(2.0, rel=0.01)
    from stainctl.workspace import Workspace

    ws = Workspace.open(out / "workspace")
    grid = ws.manifest.grid(ws.manifest.slides()[0].id)
    ws.close()
    assert grid is not None and grid.tile_size == 128 - 2 * 16


def test_phikon_loads_from_a_folder_or_says_how_to_get_it_offline(tmp_path, monkeypatch):
    from histdist_helpers import install_phikon

    from stainctl.engines.histdist.phikon import load_phikon

    install_phikon(tmp_path)
    phikon = load_phikon(tmp_path / "tiny-phikon")
    assert phikon.dim == 32 and phikon.size == 32
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match="stainctl models pull phikon"):
        load_phikon("owkin/phikon")  # a hub id: offline and not cached, at once
