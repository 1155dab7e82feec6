"""`train-align` on the two ANHIR pairs (H&E + PanCytokeratin, H&E + proSPC, with landmarks) and
`predict` with its model, using a tiny UNI2-h-shaped encoder built in the test."""

from __future__ import annotations

import csv
import json
import math
import tomllib

import cv2
import numpy as np
import pytest
from models_helpers import save_weights, tiny_encoder_text

from stainctl import interrupt

LOCAL = '\n[[weights]]\nrole = "encoder"\npath = "pytorch_model.bin"\n'
CLASSES = "low<0.02<high"  # mean DAB OD of these 5 %-scale IHC tiles spans about 0.012-0.047


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A tiny encoder taking 128-px tiles (2 x 2 crops of 64 px) at 0.5 µm/px."""
    directory = tmp_path / "models"
    card = directory / "tiny-enc" / "card.toml"
    card.parent.mkdir(parents=True)
    card.write_text(tiny_encoder_text("tiny-enc", tile_size=128, crop=64, depth=1,
                                      weights=LOCAL))
    save_weights(card, card.parent / "pytorch_model.bin")
    monkeypatch.setenv("STAINCTL_MODELS", str(directory))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return directory


@pytest.fixture
def pairs(data_dir):
    d = data_dir / "paired"
    return [(d / "anhir_rat-kidney" / "Rat-Kidney_HE.jpg",
             d / "anhir_rat-kidney" / "Rat-Kidney_PanCytokeratin.jpg"),
            (d / "anhir_lung-lesion-birl" / "Izd2-29-041-w35_HE.jpg",
             d / "anhir_lung-lesion-birl" / "Izd2-29-041-w35_proSPC.jpg")]


def _args(pairs, out, steps, *extra):
    args = ["train-align", "--marker", "pck", "--encoder", "tiny-enc", "--classes", CLASSES,
            "--measure", "dab-mean", "--default-mpp", "0.5", "--device", "cpu",
            "--steps", steps, "--batch", 16, "--checkpoint-every", 10, "-o", out, *extra]
    for he, ihc in pairs:
        args += ["--pair", f"{he},{ihc}"]
    return args


@pytest.mark.slow
def test_train_align_learns_the_pairs_and_predict_classifies_slides(cli, tmp_path, models,
                                                                    pairs, cmu1_path):
    out = tmp_path / "pck-align"
    r = cli(*_args(pairs, out, 120, "--pool", "attention", "--json"))
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 120 == res["steps"]
    nce = [h["infonce"] for h in history]
    assert np.mean(nce[-20:]) < 0.8 * np.mean(nce[:20])  # the InfoNCE loss falls
    m = res["metrics"]
    for pair in m["retrieval"]:  # paired retrieval on the training pairs beats chance
        assert pair["tiles"] >= 10 and pair["top1"] > 3 * pair["chance"], pair
    for s in m["slides"]:  # registered on the landmarks: the error falls
        reg = s["registration"]
        assert reg["method"] == "landmarks" and reg["error_after_px"] < reg["error_before_px"]
    assert 0 <= m["tile_classes"]["weighted_f1"] <= 1
    lo, hi = m["tile_classes"]["weighted_f1_ci95"]
    assert lo <= m["tile_classes"]["weighted_f1"] <= hi
    # The card (installed where predict finds it) says what it was made from and how it did.
    card = tomllib.loads((models / "pck-align" / "card.toml").read_text())
    assert card["kind"] == "classifier" and card["encoder"] == "tiny-enc"
    assert card["architecture"]["classes"] == ["low", "high"]
    assert card["architecture"]["pool"] == "attention"
    assert card["metrics"]["training_slides"] == ["Rat-Kidney_HE", "Izd2-29-041-w35_HE"]
    assert card["metrics"]["retrieval_top1_training_pairs"] > card["metrics"]["retrieval_chance"]
    assert (out / "loss.png").stat().st_size > 1000
    shown = cli("models", "show", "pck-align")
    assert shown.exit_code == 0 and "metrics.tile_weighted_f1_ci95: [" in shown.stdout

    # predict on two H&E slides: the ANHIR H&E image and the CMU-1 sample.
    ws = tmp_path / "ws"
    he_jpg = pairs[0][0]
    assert cli("tile", he_jpg, cmu1_path, "-w", ws, "--mpp", "0.5", "--tile-size", 128,
               "--target-mpp", 0.5).exit_code == 0
    assert cli("filter", "-w", ws, "--min-laplacian", 0).exit_code == 0
    r = cli("predict", "-w", ws, "--model", "pck-align", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    slides = json.loads(r.stdout)["slides"]
    assert [s["state"] for s in slides] == ["done", "done"]
    with open(ws / "outputs" / "predict.pck-align.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row, s in zip(rows, slides, strict=True):
        assert row["class"] in ("low", "high") and row["slide"] == s["slide"]
        p = float(row["probability"])
        assert 0.5 <= p <= 1 and p == pytest.approx(float(row[f"p_{row['class']}"]), abs=1e-5)
        d = s["details"]
        heat = cv2.imread(d["heatmap"])  # readout's form: 8 px a tile, white where none
        w, h = (2220, 2967) if "CMU" in s["slide"] else cv2.imread(str(he_jpg)).shape[1::-1]
        assert heat is not None and heat.shape[:2] == (8 * math.ceil(h / 128),
                                                       8 * math.ceil(w / 128))
        assert heat.std() > 5 and (heat == 255).all(axis=2).any()
        with open(d["geojson"]) as fh:
            geo = json.load(fh)
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) == int(row["tiles"])
        xs = np.array([f["geometry"]["coordinates"][0] for f in geo["features"]])
        assert xs[..., 0].min() >= 0 and xs[..., 1].min() >= 0  # polygons inside the slide
        assert xs[..., 0].max() <= w and xs[..., 1].max() <= h
        for f in geo["features"][:5]:
            meas = f["properties"]["measurements"]
            assert meas["p_low"] + meas["p_high"] == pytest.approx(1, abs=1e-5)
            assert f["properties"]["classification"]["name"] in ("low", "high")
        scores = [f["properties"]["measurements"]["score"] for f in geo["features"]]
        assert float(row["mean_tile_score"]) == pytest.approx(np.mean(scores), abs=1e-5)
    status = json.loads(cli("status", "-w", ws, "--json").stdout)["slides"][0]
    assert status["steps"]["predict:pck-align"] == "done"

    # An encoder is not an align model: one line naming the fix.
    r = cli("predict", "-w", ws, "--model", "tiny-enc")
    assert r.exit_code == 2 and "train-align" in r.output and "pck-align" in r.output


@pytest.mark.slow
def test_killed_train_align_resumes_to_the_same_history(cli, tmp_path, models, pairs,
                                                        monkeypatch):
    whole = tmp_path / "whole"
    assert cli(*_args(pairs, whole, 40, "-q")).exit_code == 0
    expected = json.loads((whole / "history.json").read_text())

    cut = tmp_path / "cut"
    real_check = interrupt.check
    calls = {"n": 0}

    def sigterm_at_step_25() -> None:  # SIGTERM arriving during step 25 (after checkpoint 20)
        calls["n"] += 1
        if calls["n"] == 25 + 2:  # two checks while the pairs load and embed
            raise interrupt.Interrupted(15)
        real_check()

    monkeypatch.setattr(interrupt, "check", sigterm_at_step_25)
    r = cli(*_args(pairs, cut, 40, "-q"))
    assert r.exit_code == 143, r.output
    assert not (cut / "history.json").exists() and (cut / "run" / "checkpoint.pt").exists()
    monkeypatch.setattr(interrupt, "check", real_check)
    r = cli(*_args(pairs, cut, 40, "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads((cut / "history.json").read_text()) == expected
    assert (cut / "heads.safetensors").read_bytes() == (whole / "heads.safetensors").read_bytes()


def test_tile_labels_are_readouts_of_the_registered_ihc_tiles(pairs):
    from stainctl.align.data import ClassBins, default_measure, pair_tiles, tile_labels
    from stainctl.readout.measure import measure_tile

    he, ihc = pairs[0]
    pair = pair_tiles(he, ihc, mpp=0.5, tile=128, default_mpp=0.5)
    assert len(pair.he) == len(pair.ihc) == len(pair.xy0) >= 20
    bins = ClassBins.parse("low<2<high")
    values, labels, slide_label, source = tile_labels(pair, bins, "positive-area", None)
    expected = [100 * measure_tile(t, 0.5).positive_fraction for t in pair.ihc]
    assert values == pytest.approx(expected)
    assert labels.tolist() == [int(v >= 2) for v in expected]
    assert slide_label == int(np.mean(expected) >= 2) and source == "mean tile positive-area"
    assert default_measure("Ki-67") == "index" and default_measure("her2") == "positive-area"
    assert ClassBins.parse("neg<1<low<20<high").bin(20) == 2


def test_train_align_refuses_bad_input_with_the_fix(cli, tmp_path, models, pairs):
    he, ihc = pairs[0]
    base = ["train-align", "--marker", "pck", "--encoder", "tiny-enc", "--pair", f"{he},{ihc}"]
    r = cli(*base)
    assert r.exit_code == 2 and "--classes" in r.output and "--labels" in r.output
    r = cli(*base, "--classes", "high<0.1<low<0.05<x")
    assert r.exit_code == 2 and "increasing thresholds" in r.output
    r = cli(*base, "--classes", "low<0.1<high", "--pool", "median")
    assert r.exit_code == 2 and "mean, max, attention" in r.output
    r = cli("train-align", "--marker", "pck", "--pair", str(he), "--classes", "a<1<b")
    assert r.exit_code == 2 and "HE,IHC" in r.output
    r = cli(*base[:-1], f"{he},{tmp_path / 'missing.jpg'}", "--classes", "a<1<b")
    assert r.exit_code == 2 and "missing.jpg does not exist" in r.output
    r = cli(*base, "--classes", "low<2<high")  # a JPEG has no pixel size
    assert r.exit_code == 2 and "--default-mpp" in r.output and he.name in r.output


@pytest.mark.slow
def test_sigkilled_train_align_resumes_to_the_same_history(cli, tmp_path, models, pairs):
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = 1500  # long enough (~5 ms a step) for the kill to land mid-run
    cut = tmp_path / "cut"
    env = {**os.environ, "STAINCTL_MODELS": str(models), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stainctl",
                             *map(str, _args(pairs, cut, steps, "-q"))], env=env)
    ckpt = cut / "run" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.01)
    time.sleep(0.05)  # the kill lands between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (cut / "history.json").exists(), "killed too late"
    import torch

    saved = json.loads(torch.load(ckpt, weights_only=True)["history"])
    assert 10 <= len(saved) < steps  # the rerun resumes from here, not from the start
    r = cli(*_args(pairs, cut, steps, "-q"))
    assert r.exit_code == 0, r.output
    whole = tmp_path / "whole"
    assert cli(*_args(pairs, whole, steps, "-q")).exit_code == 0
    assert (json.loads((cut / "history.json").read_text())
            == json.loads((whole / "history.json").read_text()))
