"""Training: the fast trainer's data, losses and loop, `stainctl train`, the shared stain and
registration modules, and model cards as every trainer writes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stainctl.engines.fast.data import load_image
from stainctl.engines.fast.model import FastConfig
from stainctl.engines.fast.train import TrainConfig, train


def test_train_help_lists_the_trainer_options(cli):
    r = cli("train", "--help")
    assert r.exit_code == 0
    for option in ("--he", "--ihc", "--marker", "--hold-out", "--pair", "--steps", "--out"):
        assert option in r.stdout


@pytest.mark.slow
def test_train_makes_a_model_that_translate_uses_at_once(cli, tmp_path, use_models, he_ome_path,
                                                         ihc_png_path, cmu1_path, ki67_ome_paths):
    models = use_models()
    run = tmp_path / "runs" / "ki67"
    r = cli("train", "--he", he_ome_path, "--ihc", ki67_ome_paths[0], "--ihc", ihc_png_path,
            "--marker", "ki67",
            "--name", "my-ki67", "--steps", "3", "--batch", "1", "--crop", "128", "--pair",
            f"{LUNG / 'Izd2-29-041-w35_HE.jpg'},{LUNG / 'Izd2-29-041-w35_proSPC.jpg'}",
            "-o", run, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["steps"] == 3 and res["card"] == str(models / "my-ki67" / "card.toml")
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 3 and all(h["lowres"] > 0 for h in history)  # the pair was used
    assert (run / "loss.png").stat().st_size > 1000
    from stainctl.models.registry import get_card

    card = get_card("my-ki67", models)
    assert card.engine == "fast" and card.marker == "ki67" and "--hold-out" not in \
        card.training_data and "Izd2-29-041-w35_HE.jpg" in card.training_data
    listed = json.loads(cli("models", "list", "--json").stdout)["models"]
    assert any(m["name"] == "my-ki67" and m["installed"] for m in listed)
    r = cli("translate", cmu1_path, "--marker", "my-ki67", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["slides"][0]["state"] == "done"
    assert (tmp_path / "out" / "CMU-1-Small-Region.my-ki67.ome.tiff").exists()


def test_train_refuses_bad_options_with_the_fix(cli, tmp_path, use_models, he_ome_path,
                                                ki67_ome_paths):
    use_models()
    base = ["train", "--he", he_ome_path, "--ihc", ki67_ome_paths[0], "--marker", "ki67"]
    r = cli(*base, "--pair", "only-one.png")
    assert r.exit_code == 2 and "--pair takes HE,IHC" in r.stderr
    r = cli(*base, "--hold-out", "1.5")
    assert r.exit_code == 2 and "--hold-out must be in [0, 1)" in r.stderr
    r = cli(*base, "--name", "my model")
    assert r.exit_code == 2 and "a model name may hold" in r.stderr
    r = cli(*base, "--name", "demo-ki67")
    assert r.exit_code == 2 and "shipped with stainctl" in r.stderr
    # A name translate could not use (it becomes part of file names) is refused before training,
    # by the same rule that every card, train-lora and the tile store apply.
    r = cli(*base, "--name", "ki67.v2", "-o", tmp_path / "m")
    assert r.exit_code == 2 and "a model name may hold" in r.stderr
    assert not (tmp_path / "m").exists()
    r = cli("train-lora", "--marker", "ki67", "--he", he_ome_path, "--ihc", ki67_ome_paths[0],
            "--name", "ki67.v2", "-o", tmp_path / "l")
    assert r.exit_code == 2 and "a model name may hold" in r.stderr


def test_short_training_lowers_the_loss_and_resumes(tmp_path, cmu1_path, he_ome_path,
                                                    ki67_ome_paths):
    he = [load_image(cmu1_path, 0.5), load_image(he_ome_path, 0.5)]
    ihc = [load_image(p, 0.5) for p in ki67_ome_paths]
    config = TrainConfig(crop=64, batch=2, steps=30, checkpoint_every=15, seed=1,
                         model=FastConfig(widths=(8, 16, 32), marker_dim=8))
    _, state = train(he, ihc, config, tmp_path / "run", log=False)
    d = [h["d"] for h in state.history]
    assert np.mean(d[-5:]) < np.mean(d[:5])  # the discriminator learns the IHC look
    # Resuming from the last checkpoint continues the count instead of starting again.
    longer = TrainConfig(**{**config.__dict__, "steps": 40})
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    _, resumed = train(he, ihc, longer, tmp_path / "run", log=False)
    assert resumed.step == 40 and len(resumed.history) == 40
    assert resumed.history[:30] == state.history
    # The resumed steps are seeded from the checkpoint: resuming it again gives the same run.
    _, again = train(he, ihc, longer, tmp_path / "again", log=False)
    assert again.history == resumed.history


def test_glass_loss_sees_only_glass(cmu1_path):
    from stainctl.engines.fast.losses import glass_loss

    tile = load_image(cmu1_path, 0.5)[800:1056, 400:656]  # tissue and glass
    x = torch.from_numpy(tile.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    f = tile.astype(np.float32)
    glass = torch.from_numpy((f.mean(2) > 229.5) & (f.max(2) - f.min(2) < 12.75))
    assert 0.1 < glass.float().mean() < 0.9
    assert glass_loss(x, x) == 0
    tinted = x.clone()
    tinted[:, 2] -= 0.2  # a colour cast everywhere
    assert glass_loss(tinted, x) == pytest.approx(0.2 / 3, rel=1e-4)
    stained = torch.where(glass, x, x * 0.5)  # only the tissue changes
    assert glass_loss(stained, x) == 0



def test_held_out_ihc_never_reaches_training(cli, tmp_path, use_models, he_ome_path,
                                             ki67_ome_paths):
    from stainctl.engines.fast.data import hold_out

    ki67 = load_image(ki67_ome_paths[0], 0.5)
    kept, strip = hold_out(ki67, 0.25, 128)
    assert strip is not None and strip.shape[1] % 128 == 0
    assert kept.shape[1] + strip.shape[1] == ki67.shape[1]
    assert np.array_equal(np.hstack([kept, strip]), ki67)  # disjoint columns, nothing lost
    assert hold_out(ki67[:, :200], 0.25, 128)[1] is None  # no room for a crop on each side
    assert hold_out(ki67, 0.0, 128)[1] is None

    use_models()
    out = tmp_path / "run"
    r = cli("train", "--he", he_ome_path, *[a for p in ki67_ome_paths for a in ("--ihc", p)],
            "--marker", "ki67", "--steps", "1", "--batch", "1", "--crop", "128",
            "--hold-out", "0.25", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    crops = sorted((out / "held_out").glob("*.png"))
    assert crops and {c.name.rsplit("_", 1)[0] for c in crops} == \
        {p.name.split(".")[0] for p in ki67_ome_paths}
    stem = ki67_ome_paths[0].name.split(".")[0]
    first = cv2.imread(str(out / "held_out" / f"{stem}_0.png"))[..., ::-1]
    blocks = [strip[y:y + 128, x:x + 128] for y in range(0, strip.shape[0] - 127, 128)
              for x in range(0, strip.shape[1] - 127, 128)]
    assert any(np.array_equal(first, b) for b in blocks)  # a crop of the held-out strip
    assert (out / "generator.safetensors").exists()
    assert json.loads(r.stdout)["held_out"] == len(crops)


LUNG = Path(__file__).resolve().parents[2] / "shared" / "data" / "paired" / "anhir_lung-lesion-birl"


def _crop(image, y, x, size=256):
    return torch.from_numpy(image[y:y + size, x:x + size].copy()).permute(2, 0, 1)[None].float() \
        / 127.5 - 1


def test_paired_losses_tolerate_misalignment(he_ome_path):
    from stainctl.engines.fast.losses import PatchDiscriminator, feature_matching, lowres_l1

    he = load_image(he_ome_path, 0.5)
    x = _crop(he, 100, 100)
    shifted = torch.roll(x, shifts=(12, 12), dims=(2, 3))  # a serial section's offset
    other = _crop(he, 250, 250)  # different tissue
    plain = (x - shifted).abs().mean()
    assert lowres_l1(x, shifted, 16) < 0.5 * plain
    assert lowres_l1(x, shifted, 16) < lowres_l1(x, other, 16)
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    assert feature_matching(disc, x, shifted) < 0.5 * feature_matching(disc, x, other)


def test_pairs_are_registered_on_their_landmarks():
    from stainctl.engines.fast.data import load_pair

    he, ihc = load_pair(LUNG / "Izd2-29-041-w35_HE.jpg", LUNG / "Izd2-29-041-w35_proSPC.jpg",
                        0.5, 0.5)
    raw = cv2.resize(load_image(LUNG / "Izd2-29-041-w35_proSPC.jpg", 0.5, 0.5),
                     (he.shape[1], he.shape[0]))

    def blurred(a):
        grey = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return cv2.GaussianBlur(grey, (0, 0), 8).ravel()

    assert he.shape == ihc.shape
    after = np.corrcoef(blurred(he), blurred(ihc))[0, 1]
    before = np.corrcoef(blurred(he), blurred(raw))[0, 1]
    assert after > before + 0.08, (before, after)


def test_training_with_pairs_adds_the_paired_losses_reproducibly(tmp_path):
    from stainctl.engines.fast.data import load_pair

    pair = load_pair(LUNG / "Izd2-29-041-w35_HE.jpg", LUNG / "Izd2-29-041-w35_proSPC.jpg",
                     0.5, 0.5)
    config = TrainConfig(steps=2, batch=1, crop=128, model=FastConfig(markers=("ki67",)))
    runs = [train([pair[0]], [pair[1]], config, tmp_path / f"run{i}", log=False,
                  pairs=[pair])[1].history for i in range(2)]
    # Same seed, same run (up to CPU kernels' float reassociation between runs).
    for a, b in zip(*runs, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert all(h["lowres"] > 0 and h["fm"] > 0 for h in runs[0])


def test_training_and_evaluation_measure_dab_alike(ihc_png_path, cmu1_path):
    from skimage.color import rgb2hed

    from stainctl.engines.fast.losses import dab_stats_loss
    from stainctl.evaluate.stain import dab_stats
    from stainctl.stain.deconvolution import dab_density, dab_density_torch

    ihc = cv2.imread(str(ihc_png_path))[..., ::-1][:256, :256].copy()
    x = torch.from_numpy(ihc).permute(2, 0, 1)[None].float() / 127.5 - 1
    numpy_dab, torch_dab = dab_density(ihc), dab_density_torch(x)[0].numpy()
    assert np.abs(numpy_dab - torch_dab).max() < 1e-4  # one definition, two backends
    assert np.abs(numpy_dab - np.maximum(rgb2hed(ihc)[..., 2], 0)).max() < 1e-5
    assert numpy_dab.max() > 0.1  # the image does have DAB
    # The loss the trainer minimises is zero exactly where evaluation sees the same stain.
    assert dab_stats_loss(x, x) == 0
    he = torch.from_numpy(load_image(cmu1_path, 0.5)[800:1056, 400:656].copy()).permute(2, 0, 1)
    he = he[None].float() / 127.5 - 1
    assert dab_stats_loss(he, x) > 0.01
    top = np.sort(numpy_dab.ravel())[-(numpy_dab.size // 10):]
    assert dab_stats(ihc).p90 == pytest.approx(float(top.mean(dtype=np.float64)), rel=1e-6)


def test_one_tissue_rule_for_crops_and_glass(cmu1_path):
    from stainctl.stain.tissue import glass_mask, glass_mask_torch, is_tissue_crop

    he = load_image(cmu1_path, 0.5)
    tissue, glass = he[1200:1328, 900:1028], np.full((128, 128, 3), 242, np.uint8)
    assert is_tissue_crop(tissue) and not is_tissue_crop(glass)
    tile = he[800:1056, 400:656]
    x = torch.from_numpy(tile.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert np.array_equal(glass_mask(tile), glass_mask_torch(x)[0, 0].numpy())
    assert 0.1 < glass_mask(tile).mean() < 0.9


def test_registration_lives_where_training_and_evaluation_both_find_it():
    import stainctl.evaluate.paired as paired
    from stainctl.slide.registration import (
        landmarks_beside,
        read_landmarks,
        register_landmarks,
    )

    he, ihc = LUNG / "Izd2-29-041-w35_HE.jpg", LUNG / "Izd2-29-041-w35_proSPC.jpg"
    reg = register_landmarks(read_landmarks(landmarks_beside(he)),
                             read_landmarks(landmarks_beside(ihc)), (1000, 1000))
    assert reg.landmarks >= 4 and reg.error_after < reg.error_before
    assert not hasattr(paired, "register_landmarks")  # one copy, not two


CARD_GOLDEN = '''name = "site-ki67"
kind = "marker"
engine = "fast"
input_mpp = 0.5
tile_size = 512
licence = "as the training images"
intended_use = "Research only: \\"not\\" for diagnosis"
training_data = "H&E: a.svs, b.png; 0.5 µm/px\\nsecond line"
marker = "ki67"

[architecture]
margin = 32
alpha = 4.0
flags = [true, false]

[architecture.nested]
steps = [1, 2]

[[weights]]
role = "generator"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
path = "generator.safetensors"

[[weights]]
role = "encoder"
filename = "model.bin"
repo = "org/model"
revision = "abc"
gated = true
'''


def test_model_card_writer_round_trips_and_matches_its_golden_text(tmp_path):
    from stainctl.errors import ModelError
    from stainctl.models.card import ModelCard, WeightFile, load_card, write_card
    from stainctl.models.registry import SHIPPED

    card = ModelCard(
        name="site-ki67", kind="marker", engine="fast", input_mpp=0.5, tile_size=512,
        licence="as the training images", intended_use='Research only: "not" for diagnosis',
        training_data="H&E: a.svs, b.png; 0.5 µm/px\nsecond line", marker="ki67",
        architecture={"margin": 32, "alpha": 4.0, "flags": [True, False],
                      "nested": {"steps": [1, 2]}},
        weights=(WeightFile(role="generator", path="generator.safetensors", sha256="0" * 64),
                 WeightFile(role="encoder", filename="model.bin", repo="org/model",
                            revision="abc", gated=True)))
    assert card.to_toml() == CARD_GOLDEN
    path = write_card(card, tmp_path / "card.toml")
    assert load_card(path) == ModelCard(**{**card.__dict__, "origin": path})
    with pytest.raises(ModelError, match="a marker model must name its marker"):
        write_card(ModelCard(**{**card.__dict__, "marker": ""}), tmp_path / "bad.toml")
    assert not (tmp_path / "bad.toml").exists()
    for shipped in SHIPPED.glob("*.toml"):  # every shipped card survives the writer
        again = write_card(load_card(shipped), tmp_path / shipped.name)
        assert load_card(again) == ModelCard(**{**load_card(shipped).__dict__, "origin": again})
