"""`translate`: the main job on the real CMU-1 sample with a fast model, and its training code."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import CMU1, NDPI_DAPI, OME_HE, OME_KI67
from models_helpers import install_fast

from stainctl.engines.fast.model import FastConfig
from stainctl.engines.fast.train import TrainConfig, load_image, train


@pytest.fixture
def models(use_models):
    return use_models(install_fast)


def test_main_job_writes_a_virtual_slide_over_the_tissue(cli, tmp_path, models):
    import tiffslide

    out = tmp_path / "out"
    r = cli("translate", CMU1, "--marker", "test-ki67", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    details = json.loads(r.stdout)["slides"][0]["details"]
    path = Path(details["output"])
    assert path == out.resolve() / "CMU-1-Small-Region.test-ki67.ome.tiff"
    assert Path(details["side_by_side"]).exists()
    slide = tiffslide.TiffSlide(path)
    assert slide.dimensions == (round(2220 * 0.499 / 0.5), round(2967 * 0.499 / 0.5))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5, rel=0.01)
    img = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))

    # Tissue (from the workspace's own mask) is generated, not background; glass is background.
    mask = cv2.imread(str(out / "workspace" / "slides" / "CMU-1-Small-Region" /
                          "tissue_mask.png"), cv2.IMREAD_GRAYSCALE)
    mask = cv2.resize(mask, slide.dimensions, interpolation=cv2.INTER_NEAREST) > 0
    far_glass = cv2.erode((~mask).astype(np.uint8), np.ones((301, 301), np.uint8)) > 0
    background = np.array([240, 240, 238])
    # Glass is the background colour, or near it where a tissue tile's own glass was generated.
    assert far_glass.mean() > 0.2
    assert np.abs(img[far_glass].astype(int) - background).mean() < 8
    assert np.abs(img[mask].astype(int) - background).mean() > 20

    again = json.loads(cli("translate", CMU1, "--marker", "ki67", "-o", out, "--json").stdout)
    assert again["slides"][0]["state"] == "done"  # stain name -> the installed model


def test_translate_resumes_with_missing_tiles(cli, tmp_path, models):
    ws = tmp_path / "ws"
    assert cli("tile", CMU1, "-w", ws).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    first = json.loads(cli("translate", "-w", ws, "--marker", "test-ki67", "--json").stdout)
    total = first["slides"][0]["details"]["tiles"]
    chunks = sorted((ws / "slides" / "CMU-1-Small-Region" / "translated" /
                     "test-ki67.zarr" / "c").glob("*/*/0/0/0"))
    assert len(chunks) == total > 2
    for c in chunks[:2]:  # as if a kill had left them unwritten
        c.unlink()
    from stainctl.workspace import Workspace

    w = Workspace.open(ws)  # a killed run leaves the step "running", same parameters
    sid = w.manifest.slides()[0]["id"]
    row = w.manifest.step(sid, "translate:test-ki67")
    w.manifest.set_step(sid, "translate:test-ki67", "running", params_hash=row["params_hash"],
                        params=json.loads(row["params"]))
    w.close()
    again = json.loads(cli("translate", "-w", ws, "--marker", "test-ki67", "--json").stdout)
    assert again["slides"][0]["details"]["translated_now"] == 2
    assert again["slides"][0]["details"]["tiles"] == total


def test_main_job_leaves_out_a_fluorescence_slide_with_a_reason_it_can_act_on(cli, tmp_path,
                                                                             models):
    r = cli("translate", OME_HE, NDPI_DAPI, "--marker", "test-ki67", "-o", tmp_path / "out",
            "--json")
    assert r.exit_code == 1  # one slide done, one failed
    slides = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    assert slides["OS-1-detail_HE"]["state"] == "done"
    message = slides["test3-DAPI-2-387"]["message"]
    assert "fluorescence" in message and "left out" in message
    assert "--allow-dark" not in message  # translate has no such option


def test_unknown_marker_lists_what_is_installed(cli, tmp_path, models):
    r = cli("translate", CMU1, "--marker", "ck7", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "no model makes 'ck7'" in r.stderr and "test-ki67 (ki67)" in r.stderr
    assert "stainctl models add" in r.stderr


def test_engine_output_is_deterministic_on_real_tiles(models):
    from stainctl.engines.base import EngineOptions, load_engine
    from stainctl.models.registry import get_card

    engine = load_engine(get_card("test-ki67", models), models, EngineOptions(device="cpu"))
    tiles = np.stack([cv2.resize(load_image(CMU1, 0.5)[800:1376, 400:976], (576, 576))] * 2)
    a, again = engine.translate(tiles, [0, 1]), engine.translate(tiles, [0, 1])
    alone = engine.translate(tiles[:1], [0])
    assert a.shape == tiles.shape and a.dtype == np.uint8
    assert np.array_equal(a, again) and np.array_equal(a[0], a[1])
    # Another batch size may pick other CPU kernels: at most a rounding step apart.
    assert np.abs(a[0].astype(int) - alone[0]).max() <= 1
    assert np.abs(a[0].astype(int) - tiles[0]).mean() > 5  # it did change the image


def test_short_training_lowers_the_loss_and_resumes(tmp_path):
    he = [load_image(CMU1, 0.5), load_image(OME_HE, 0.5)]
    ihc = [load_image(p, 0.5) for p in OME_KI67]
    config = TrainConfig(crop=64, batch=2, steps=30, checkpoint_every=15, seed=1,
                         model=FastConfig(widths=(8, 16, 32), marker_dim=8))
    _, state = train(he, ihc, config, tmp_path / "run", log=False)
    d = [h["d"] for h in state.history]
    assert np.mean(d[-5:]) < np.mean(d[:5])  # the discriminator learns the IHC look
    # Resuming from the last checkpoint continues the count instead of starting again.
    longer = TrainConfig(**{**config.__dict__, "steps": 40})
    _, resumed = train(he, ihc, longer, tmp_path / "run", log=False)
    assert resumed.step == 40 and len(resumed.history) == 40
    assert resumed.history[:30] == state.history
    assert torch.get_rng_state() is not None


def test_glass_loss_sees_only_glass():
    from stainctl.engines.fast.train import glass_loss

    tile = load_image(CMU1, 0.5)[800:1056, 400:656]  # tissue and glass
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


def test_the_shipped_model_stains_tissue_and_leaves_glass_alone(tmp_path):
    from stainctl.engines.fast.engine import load_fast_engine
    from stainctl.models.registry import get_card

    he = load_image(CMU1, 0.5)
    windows = [he[y:y + 576, x:x + 576] for y in range(0, he.shape[0] - 575, 288)
               for x in range(0, he.shape[1] - 575, 288)]
    f = np.stack(windows).astype(np.float32)
    glass = (f.mean(3) > 230) & (f.max(3) - f.min(3) < 13)  # bright and unstained
    edge = (glass.mean(axis=(1, 2)) > 0.2) & (glass.mean(axis=(1, 2)) < 0.8)
    tiles, glass = np.stack(windows)[edge], glass[edge]
    engine = load_fast_engine(get_card("demo-ki67", tmp_path), tmp_path)
    change = np.abs(engine.translate(tiles).astype(int) - tiles).mean(axis=3)
    assert len(tiles) >= 10
    assert change[~glass].mean() > 20  # tissue is restained
    assert change[glass].mean() < 6  # glass stays glass (a bad seed once tinted it blue-grey)


def test_held_out_ihc_never_reaches_training(tmp_path):
    from stainctl.engines.fast.train import hold_out, main

    ki67 = load_image(OME_KI67[0], 0.5)
    kept, strip = hold_out(ki67, 0.25, 128)
    assert strip is not None and strip.shape[1] % 128 == 0
    assert kept.shape[1] + strip.shape[1] == ki67.shape[1]
    assert np.array_equal(np.hstack([kept, strip]), ki67)  # disjoint columns, nothing lost
    assert hold_out(ki67[:, :200], 0.25, 128)[1] is None  # no room for a crop on each side
    assert hold_out(ki67, 0.0, 128)[1] is None

    out = tmp_path / "run"
    main(["--he", str(OME_HE), "--ihc", *map(str, OME_KI67), "--marker", "ki67", "--steps", "1",
          "--batch", "1", "--crop", "128", "--hold-out", "0.25", "--out", str(out)])
    crops = sorted((out / "held_out").glob("*.png"))
    assert crops and {c.name.rsplit("_", 1)[0] for c in crops} == \
        {p.name.split(".")[0] for p in OME_KI67}
    first = cv2.imread(str(out / "held_out" / f"{OME_KI67[0].name.split('.')[0]}_0.png"))[..., ::-1]
    blocks = [strip[y:y + 128, x:x + 128] for y in range(0, strip.shape[0] - 127, 128)
              for x in range(0, strip.shape[1] - 127, 128)]
    assert any(np.array_equal(first, b) for b in blocks)  # a crop of the held-out strip
    assert (out / "generator.safetensors").exists()


LUNG = Path(__file__).resolve().parents[2] / "shared" / "data" / "paired" / "anhir_lung-lesion-birl"


def _crop(image, y, x, size=256):
    return torch.from_numpy(image[y:y + size, x:x + size].copy()).permute(2, 0, 1)[None].float() \
        / 127.5 - 1


def test_paired_losses_tolerate_misalignment():
    from stainctl.engines.fast.train import PatchDiscriminator, feature_matching, lowres_l1

    he = load_image(OME_HE, 0.5)
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
    from stainctl.engines.fast.train import load_pair

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
    from stainctl.engines.fast.train import load_pair

    pair = load_pair(LUNG / "Izd2-29-041-w35_HE.jpg", LUNG / "Izd2-29-041-w35_proSPC.jpg",
                     0.5, 0.5)
    config = TrainConfig(steps=2, batch=1, crop=128, model=FastConfig(markers=("ki67",)))
    runs = [train([pair[0]], [pair[1]], config, tmp_path / f"run{i}", log=False,
                  pairs=[pair])[1].history for i in range(2)]
    # Same seed, same run (up to CPU kernels' float reassociation between runs).
    for a, b in zip(*runs, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert all(h["lowres"] > 0 and h["fm"] > 0 for h in runs[0])
