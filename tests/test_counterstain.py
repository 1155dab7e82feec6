"""The fast trainer's counterstain terms (issue 22): haematoxylin statistics, DAB tail, DAB
confined to nuclei-shaped structures, colour of non-nuclear tissue; `stainctl train --device`
and `--loss-weight`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fast_helpers import to_model_range as _t

from stainctl.engines.fast.data import load_image
from stainctl.engines.fast.losses import (
    background_colour_loss,
    dab_outside_nuclei_loss,
    dab_tail_loss,
    dab_upper_loss,
    haematoxylin_stats_loss,
    nuclei_mask_torch,
    tissue_mask_torch,
)
from stainctl.engines.fast.model import FastConfig
from stainctl.engines.fast.train import TrainConfig, counterstain_losses, train
from stainctl.stain.deconvolution import dab_density_torch, hed_density_torch


@pytest.fixture(scope="module")
def ki67_crop(ki67_ome_paths) -> np.ndarray:
    """256 px of the NDPI Ki67 scan at 0.5 µm/px: blue nuclei, a few brown ones, pale stroma."""
    return load_image(ki67_ome_paths[0], 0.5)[300:556, 200:456].copy()


@pytest.fixture(scope="module")
def he_crop(cmu1_path) -> np.ndarray:
    return load_image(cmu1_path, 0.5)[1200:1456, 900:1156].copy()


def test_hed_density_matches_rgb2hed_and_the_dab_channel(ki67_crop):
    from skimage.color import rgb2hed

    x = _t(ki67_crop)
    hed = hed_density_torch(x)[0].numpy()
    assert np.abs(hed - np.maximum(rgb2hed(ki67_crop), 0)).max() < 1e-4
    assert torch.equal(hed_density_torch(x)[..., 2], dab_density_torch(x))


def test_nuclei_mask_keeps_blobs_and_drops_fibres():
    img = np.full((96, 96, 3), 235, np.uint8)
    img[:, :] = (215, 200, 210)  # pale tissue everywhere
    img[20:32, 20:32] = (60, 60, 120)  # a 6-µm nucleus at 0.5 µm/px
    img[60:62, :] = (60, 60, 120)  # a 1-µm fibre as dark as the nucleus
    x = _t(img)
    mask = nuclei_mask_torch(hed_density_torch(x), tissue_mask_torch(x), with_dab=False)[0]
    assert mask[22:30, 22:30].all()  # the nucleus survives the opening
    assert not mask[58:64].any()  # the fibre does not


def test_nuclei_mask_of_a_real_ki67_crop_finds_the_readout_nuclei(ki67_crop):
    from stainctl.readout.nuclei import detect_nuclei

    x = _t(ki67_crop)
    mask = nuclei_mask_torch(hed_density_torch(x), tissue_mask_torch(x), with_dab=True)[0].numpy()
    nuclei = detect_nuclei(ki67_crop, 0.5)
    assert nuclei.count >= 10
    covered = np.bincount(nuclei.labels.ravel(), weights=mask.ravel(),
                          minlength=nuclei.count + 1)[1:] / np.bincount(
        nuclei.labels.ravel(), minlength=nuclei.count + 1)[1:]
    assert np.mean(covered > 0.3) > 0.9  # the readout's nuclei lie in the mask
    assert (mask & (nuclei.labels > 0)).sum() > 0.8 * mask.sum()  # and it is mostly nuclei
    assert 0.03 < mask.mean() < 0.4


def test_dab_tail_is_what_evaluation_reports(ki67_crop, he_crop):
    from stainctl.evaluate.stain import dab_stats

    real, he = _t(ki67_crop), _t(he_crop)
    dab_r, dab_h = dab_density_torch(real), dab_density_torch(he)
    assert dab_tail_loss(dab_r, dab_r) == 0
    expected = abs(dab_stats(ki67_crop).p90 - dab_stats(he_crop).p90)
    assert float(dab_tail_loss(dab_h, dab_r)) >= expected - 1e-4  # p90 part, plus the area part


def test_dab_upper_pulls_olive_nuclei_up_to_brown(ki67_crop):
    """DAB capped just below the positive threshold (olive nuclei, nothing counted positive):
    the sorted upper tail tells it from the real crop, and its gradient raises the capped
    pixels, not the others."""
    dab_r = dab_density_torch(_t(ki67_crop))
    assert float((dab_r > 0.15).float().mean()) > 0.005  # the crop has brown nuclei
    assert dab_upper_loss(dab_r, dab_r) == 0
    olive = dab_r.clamp_max(0.14).requires_grad_(True)
    assert float(dab_upper_loss(olive.detach(), dab_r)) > 0.01
    dab_upper_loss(olive, dab_r).backward()
    assert olive.grad is not None
    capped = dab_r >= 0.14
    assert float(olive.grad[capped].max()) < 0  # descent raises every capped pixel
    low = dab_r < torch.quantile(dab_r.flatten(), 0.9)
    assert float(olive.grad[low].abs().max()) == 0  # the bulk of the tissue is left alone


def test_counterstain_terms_tell_a_browned_he_from_a_ki67(ki67_crop, he_crop):
    """Every term is lower for the real IHC against itself than for the same IHC browned all
    over (what the old demo model did), and the DAB-outside-nuclei term ignores brown nuclei."""
    real = _t(ki67_crop)
    tissue = tissue_mask_torch(real)
    hed = hed_density_torch(real)
    nuclei = nuclei_mask_torch(hed, tissue, with_dab=True)
    browned = real.clone()
    browned[:, 2] -= 0.35 * tissue.float()  # less blue, more brown, on all tissue
    browned[:, 1] -= 0.2 * tissue.float()
    bhed = hed_density_torch(browned)
    assert haematoxylin_stats_loss(hed, tissue, hed, tissue) == 0
    assert haematoxylin_stats_loss(bhed, tissue, hed, tissue) > 0.005
    assert background_colour_loss(real, tissue & ~nuclei, real, tissue & ~nuclei) == 0
    assert background_colour_loss(browned, tissue & ~nuclei, real, tissue & ~nuclei) > 0.05
    outside = dab_outside_nuclei_loss(bhed[..., 2], nuclei, tissue, hed[..., 2], nuclei, tissue)
    assert outside > 10 * dab_outside_nuclei_loss(hed[..., 2], nuclei, tissue, hed[..., 2],
                                                  nuclei, tissue)
    # Browning only inside the nuclei costs nothing outside them.
    only = torch.where(nuclei[:, None], browned, real)
    assert dab_outside_nuclei_loss(hed_density_torch(only)[..., 2], nuclei, tissue, hed[..., 2],
                                   nuclei, tissue) == pytest.approx(
        float(dab_outside_nuclei_loss(hed[..., 2], nuclei, tissue, hed[..., 2], nuclei, tissue)),
        abs=1e-6)


def test_off_stain_sees_green_and_pink_but_not_blue_and_brown(ki67_crop, he_crop):
    from stainctl.engines.fast.losses import off_stain_loss
    from stainctl.stain.deconvolution import off_stain_residual_torch

    def flat(rgb):
        return _t(np.full((8, 8, 3), rgb, np.uint8))

    blue, brown = flat((120, 130, 180)), flat((140, 90, 50))
    green, pink = flat((150, 200, 90)), flat((230, 120, 190))
    for ok in (blue, brown):
        assert off_stain_residual_torch(ok).mean() < 0.012
    for bad in (green, pink):
        assert off_stain_residual_torch(bad).mean() > 0.025
    real, he = _t(ki67_crop), _t(he_crop)
    itself = off_stain_loss(real, tissue_mask_torch(real), real, tissue_mask_torch(real))
    assert 10 * itself < off_stain_loss(he, tissue_mask_torch(he), real, tissue_mask_torch(real))
    greened = real.clone()
    greened[:, 1] += 0.3 * (real.mean(dim=1) < 0.3)  # the darker pixels (nuclei) turn green
    assert off_stain_loss(greened, tissue_mask_torch(real), real, tissue_mask_torch(real)) \
        > 5 * itself


def test_nuclear_term_only_for_nuclear_markers_and_weights_validate():
    assert TrainConfig(marker="ki67").nuclear_weight == 20
    assert TrainConfig(marker="her2").nuclear_weight == 0  # membranous: DAB is not in nuclei
    assert TrainConfig(marker="her2", w_nuclear=3).nuclear_weight == 3
    with pytest.raises(ValueError, match="haematoxylin"):
        TrainConfig(w_haematoxylin=-1)


def test_counterstain_losses_give_gradients(he_crop, ki67_crop):
    x, y = _t(he_crop), _t(ki67_crop)
    fake = x.clone().requires_grad_(True)
    terms = counterstain_losses(fake, x, y, TrainConfig())
    assert set(terms) == {"dab_tail", "dab_upper", "haematoxylin", "nuclear", "background",
                          "off_stain", "nuclei_colour", "tissue_colour"}
    sum(terms.values()).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    none = counterstain_losses(x, x, y, TrainConfig(marker="her2"))
    assert none["nuclear"] == 0


def test_training_logs_the_counterstain_terms_and_a_zero_weight_drops_one(tmp_path, cmu1_path,
                                                                          ki67_ome_paths):
    he = [load_image(cmu1_path, 0.5)]
    ihc = [load_image(ki67_ome_paths[0], 0.5)]
    small = FastConfig(widths=(8, 16, 32), marker_dim=8)
    base = TrainConfig(crop=64, batch=2, steps=2, seed=3, model=small)
    _, state = train(he, ihc, base, tmp_path / "a", log=False)
    h = state.history[-1]
    assert all(h[k] >= 0 for k in ("dab_tail", "haematoxylin", "nuclear", "background",
                                    "off_stain"))
    # The weights enter the total: another weight, another generator loss on the same batch.
    other = TrainConfig(**{**base.__dict__, "w_haematoxylin": 1000.0, "steps": 1})
    _, again = train(he, ihc, other, tmp_path / "b", log=False)
    assert again.history[0]["haematoxylin"] == pytest.approx(state.history[0]["haematoxylin"])
    assert again.history[0]["g"] != pytest.approx(state.history[0]["g"])


def test_train_device_and_loss_weight_options(cli, tmp_path, use_models, he_ome_path,
                                              ki67_ome_paths):
    use_models()
    base = ["train", "--he", he_ome_path, "--ihc", ki67_ome_paths[0], "--marker", "ki67",
            "-o", tmp_path / "m"]
    r = cli(*base, "--loss-weight", "haematoxylin")
    assert r.exit_code == 2 and "--loss-weight takes NAME=VALUE" in r.stderr
    r = cli(*base, "--loss-weight", "colour=3")
    assert r.exit_code == 2 and "no such loss" in r.stderr and "haematoxylin" in r.stderr
    r = cli(*base, "--loss-weight", "nuclear=-1")
    assert r.exit_code == 2 and "must be >= 0" in r.stderr
    r = cli(*base, "--device", "tpu")
    assert r.exit_code == 2 and "--device must be auto, cpu, cuda" in r.stderr
    if not torch.cuda.is_available():
        r = cli(*base, "--device", "cuda")
        assert r.exit_code != 0 and "--device cpu" in r.stderr
    assert not (tmp_path / "m" / "generator.safetensors").exists()
    r = cli(*base, "--device", "cpu", "--steps", "1", "--batch", "1", "--crop", "64",
            "--loss-weight", "nuclear=0", "--loss-weight", "haematoxylin=4", "--json")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "m" / "card.toml").read_text()
    assert "on cpu" in card and "nuclear=0" in card and "haematoxylin=4" in card
    assert json.loads(r.stdout)["steps"] == 1


def test_train_init_starts_from_an_installed_fast_model(cli, tmp_path, use_models, he_ome_path,
                                                        ki67_ome_paths):
    from safetensors.torch import load_file

    from stainctl.steps.train import initial_generator

    models = use_models()
    base = ["train", "--he", he_ome_path, "--ihc", ki67_ome_paths[0], "--device", "cpu",
            "--steps", "1", "--batch", "1", "--crop", "64"]
    r = cli(*base, "--marker", "ki67", "--name", "first", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    start, sha = initial_generator("first", "ki67", models)
    saved = load_file(str(tmp_path / "a" / "generator.safetensors"))
    assert all(torch.equal(v.half(), saved[k]) for k, v in start.state_dict().items())
    r = cli(*base, "--marker", "ki67", "--name", "second", "--init", "first", "-o",
            tmp_path / "b")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "b" / "card.toml").read_text()
    assert f"starting from the generator of first (sha256 {sha})" in card
    r = cli(*base, "--marker", "her2", "--init", "first", "-o", tmp_path / "c")
    assert r.exit_code == 2 and "makes ki67, not her2" in r.stderr
    r = cli(*base, "--marker", "ki67", "--init", "nosuch", "-o", tmp_path / "d")
    assert r.exit_code != 0 and "unknown model 'nosuch'" in r.stderr
