"""`stainctl embed` on the real CMU-1 sample with a tiny UNI2-h-shaped encoder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import free_port
from models_helpers import install_tiny

from stainctl.models.encoders import load_encoder
from stainctl.models.registry import get_card
from stainctl.slide.reader import open_slide
from stainctl.slide.tiles import read_tile


@pytest.fixture
def models(tmp_path, monkeypatch):
    directory = tmp_path / "models"
    install_tiny(directory, tmp_path)
    monkeypatch.setenv("STAINCTL_MODELS", str(directory))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return directory


def _filtered(cli, ws, *slides) -> None:
    assert cli("tile", *slides, "-w", ws).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0


def test_embeddings_are_the_encoders_tokens_in_float16(cli, tmp_path, models, cmu1_path):
    ws = tmp_path / "ws"
    _filtered(cli, ws, cmu1_path)
    r = cli("embed", "-w", ws, "--encoder", "tiny-uni2h", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    details = json.loads(r.stdout)["slides"][0]["details"]
    emb = np.load(details["embeddings"])
    ids = np.load(details["embeddings"].replace(".npy", ".tiles.npy"))
    db = sqlite3.connect(ws / "manifest.sqlite")
    kept = db.execute("SELECT id, x, y FROM tiles WHERE keep=1 ORDER BY id").fetchall()
    assert emb.dtype == np.float16 and emb.shape == (len(kept), 4, 48) and len(kept) >= 5
    assert ids.tolist() == [k[0] for k in kept]

    # Row i is the encoder's output for kept tile i, read from the slide independently.
    encoder = load_encoder(get_card("tiny-uni2h", models), models, device="cpu")
    grid = db.execute("SELECT extent0, tile_size FROM grids").fetchone()
    slide = open_slide(cmu1_path)
    for i in (0, len(kept) // 2, len(kept) - 1):
        tile = read_tile(slide, kept[i][1], kept[i][2], grid[0], grid[1])
        expected = encoder.encode(tile[None])[0].numpy()
        assert np.allclose(emb[i].astype(np.float32), expected, atol=2e-3, rtol=2e-3)
        assert np.abs(emb[i]).max() > 0.05  # not all zeros
    kinds = {k for (k,) in db.execute("SELECT kind FROM artifacts")}
    assert {"embeddings", "embedding_tiles"} <= kinds

    again = json.loads(cli("embed", "-w", ws, "--encoder", "tiny-uni2h", "--json").stdout)
    assert again["slides"][0]["state"] == "skipped"
    status = json.loads(cli("status", "-w", ws, "--json").stdout)["slides"][0]
    assert status["steps"]["embed:tiny-uni2h"] == "done"


def test_an_unreachable_scheduler_stops_embed_before_any_slide_is_marked(cli, tmp_path,
                                                                          models, cmu1_path):
    """Before: every slide was marked running before the client failed to connect, so
    `status` then showed them as interrupted."""

    ws = tmp_path / "ws"
    _filtered(cli, ws, cmu1_path)
    address = f"tcp://127.0.0.1:{free_port()}"
    r = cli("embed", "-w", ws, "--encoder", "tiny-uni2h", env={"STAINCTL_SCHEDULER": address})
    assert r.exit_code == 2, r.output
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert address in line and "dask scheduler" in line
    status = json.loads(cli("status", "-w", ws, "--json").stdout)["slides"][0]
    assert not any(step.startswith("embed") for step in status["steps"]), status["steps"]


def test_wrong_resolution_fails_the_slide_not_the_batch(cli, tmp_path, models, cmu1_path):
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws, "--target-mpp", "1.0").exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    r = cli("embed", "-w", ws, "--encoder", "tiny-uni2h", "--json")
    assert r.exit_code == 1
    assert "--target-mpp 0.5" in json.loads(r.stdout)["slides"][0]["message"]


@pytest.mark.slow
def test_killed_embed_resumes_with_the_unfinished_slides(cli, tmp_path, monkeypatch, cmu1_path):
    models = tmp_path / "models"
    install_tiny(models, tmp_path, depth=8)  # slower: the kill must land between slides
    slides = []
    for i in range(3):
        slides.append(tmp_path / f"slide{i}.svs")
        shutil.copyfile(cmu1_path, slides[-1])
    ws = tmp_path / "ws"
    _filtered(cli, ws, *slides)
    env = {**os.environ, "STAINCTL_MODELS": str(models), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stainctl", "embed", "-w", str(ws), "-q",
                             "--encoder", "tiny-uni2h", "--batch-size", "2", "--readers", "1"],
                            env=env)
    first = ws / "slides" / "slide0" / "embeddings" / "tiny-uni2h.npy"
    db = sqlite3.connect(ws / "manifest.sqlite", timeout=10)

    def finished() -> int:  # slides the manifest records as embedded
        return db.execute("SELECT COUNT(*) FROM steps WHERE step='embed:tiny-uni2h' "
                          "AND state='done'").fetchone()[0]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not finished():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and finished() >= 1, "a slide should have finished before the kill"
    assert not (ws / "slides" / "slide2" / "embeddings" / "tiny-uni2h.npy").exists()

    monkeypatch.setenv("STAINCTL_MODELS", str(models))
    r = cli("embed", "-w", ws, "--encoder", "tiny-uni2h", "--json")
    states = {s["slide"]: s["state"] for s in json.loads(r.stdout)["slides"]}
    assert r.exit_code == 0 and states["slide2"] == "done"
    assert list(states.values()).count("skipped") >= 1
    a = np.load(first)
    b = np.load(ws / "slides" / "slide2" / "embeddings" / "tiny-uni2h.npy")
    assert np.array_equal(a, b)  # same slide, same tokens, whichever run made them
    leftovers = list(ws.glob("slides/*/embeddings/.*tmp*"))
    assert leftovers == [] or all("slide1" in str(p) or "slide2" in str(p) for p in leftovers)


def test_embed_on_a_dask_cluster_matches_the_local_run(cli, tmp_path, models, cmu1_path):
    from distributed import LocalCluster

    ws = tmp_path / "ws"
    _filtered(cli, ws, cmu1_path)
    assert cli("embed", "-w", ws, "--encoder", "tiny-uni2h").exit_code == 0
    local = np.load(ws / "slides" / "CMU-1-Small-Region" / "embeddings" / "tiny-uni2h.npy")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        r = cli("embed", "-w", ws, "--encoder", "tiny-uni2h", "--force", "--scheduler",
                cluster.scheduler_address, "--json")
    assert r.exit_code == 0, r.output
    remote = np.load(ws / "slides" / "CMU-1-Small-Region" / "embeddings" / "tiny-uni2h.npy")
    assert np.array_equal(local, remote)
    assert torch.from_numpy(remote.astype(np.float32)).abs().max() > 0.05
