"""Model cards, weight resolution (explicit path, models dir, hub cache) and the encoders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from models_helpers import install_tiny, save_weights, tiny_card

from stainctl.errors import ModelError
from stainctl.models.card import card_from_dict, load_card
from stainctl.models.encoders import EncoderSpec, TileEncoder, build_network, load_encoder
from stainctl.models.registry import SHIPPED, all_cards, get_card
from stainctl.models.weights import load_state_dict, resolve


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache and models directory for this test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STAINCTL_MODELS", str(tmp_path / "models"))
    return tmp_path


# --- cards --------------------------------------------------------------------------------
def test_shipped_cards_describe_the_published_models():
    cards = all_cards(SHIPPED / "none")
    assert {"uni2-h", "uni", "lunit-dino-vits16"} <= set(cards)
    pixcell = {n for n, c in cards.items() if c.engine == "pixcell" and c.kind == "marker"}
    assert pixcell == {"pixcell-mist-her2", "pixcell-mist-er", "pixcell-mist-pr",
                       "pixcell-mist-ki67", "pixcell-her2match"}
    base = cards["pixcell-1024"]  # what train-lora --engine pixcell adapts
    assert base.kind == "base" and base.weight("vae").gated and base.encoder == "uni2-h"
    for name in pixcell:
        card = cards[name]
        assert card.encoder == "uni2-h" and card.tile_size == 1024
        assert card.weight("transformer").repo == "StonyBrook-CVLab/PixCell-1024"
        vae = card.weight("vae")
        assert (vae.repo, vae.subfolder, vae.gated) == (
            "stabilityai/stable-diffusion-3.5-large", "vae", True)
        key = name.removeprefix("pixcell-").replace("-", "_")
        assert card.weight("lora").filename == f"ckpts/lora/{key}_lora.pth"
        assert card.weight("flow_mlp").filename == f"ckpts/mlp/{key}_mlp.pth"
    assert cards["uni2-h"].weight("encoder").gated


@pytest.mark.parametrize(("name", "params_m", "dim", "prefix"), [
    ("uni2-h", 681.4, 1536, 9), ("uni", 303.4, 1024, 1), ("lunit-dino-vits16", 21.7, 384, 1)])
def test_card_architectures_have_the_published_sizes(name, params_m, dim, prefix):
    # Built on the meta device: the real sizes, without the memory.
    with torch.device("meta"):
        net = build_network(EncoderSpec.from_card(get_card(name, SHIPPED / "none")))
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert net.num_features == dim and net.num_prefix_tokens == prefix


def test_bad_cards_are_refused_with_the_reason(tmp_path):
    good = load_card(SHIPPED / "uni.toml").as_dict()
    good.pop("origin")
    with pytest.raises(ModelError, match="unknown field"):
        card_from_dict({**good, "colour": "blue"})
    with pytest.raises(ModelError, match="kind must be"):
        card_from_dict({**good, "kind": "stain"})
    with pytest.raises(ModelError, match="local path or a hub repo"):
        card_from_dict({**good, "weights": [{"role": "encoder", "filename": "x"}]})
    (tmp_path / "bad.toml").write_text("name = [")
    with pytest.raises(ModelError, match="not a valid model card"):
        load_card(tmp_path / "bad.toml")
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*uni2-h"):
        get_card("nope", tmp_path)


# --- weights ------------------------------------------------------------------------------
def _fake_hub_file(cache, repo: str, filename: str, data: bytes) -> None:
    """The layout huggingface_hub leaves after a download: snapshots/<commit>/<file>, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    target = base / "snapshots" / commit / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(data)


def test_resolution_order_path_then_models_dir_then_hub_cache(hub):
    import hashlib

    card = get_card("uni2-h")
    models = hub / "models"
    with pytest.raises(ModelError, match=r"stainctl models pull uni2-h.*HF_TOKEN"):
        resolve(card, "encoder", models)

    _fake_hub_file(hub / "hub", "MahmoodLab/UNI2-h", "pytorch_model.bin", b"cached")
    assert resolve(card, "encoder", models).read_bytes() == b"cached"
    (models / "uni2-h").mkdir(parents=True)
    (models / "uni2-h" / "pytorch_model.bin").write_bytes(b"local")
    assert resolve(card, "encoder", models).read_bytes() == b"local"  # models dir first

    explicit = hub / "mine.bin"
    explicit.write_bytes(b"explicit")
    digest = hashlib.sha256(b"explicit").hexdigest()
    w = replace(card.weight("encoder"), path=str(explicit), sha256=digest)
    mine = replace(card, weights=(w,))
    assert resolve(mine, "encoder", models) == explicit
    bad = replace(mine, weights=(replace(w, sha256="0" * 64),))
    with pytest.raises(ModelError, match="sha256"):
        resolve(bad, "encoder", models)


class Gadget:
    """Any class of the author's: unpickling it could run their code."""


def test_only_plain_state_dicts_are_unpickled(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_state_dict(good)["w"], torch.ones(2))
    evil = tmp_path / "evil.pth"
    torch.save({"w": Gadget()}, evil)
    with pytest.raises(ModelError, match="not a loadable weights file"):
        load_state_dict(evil)


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stainctl", *args], capture_output=True,
                          text=True, env={**os.environ, **env})


def test_offline_missing_weights_give_one_clear_error(hub, tmp_path, cmu1_path):

    env = {"HF_HUB_CACHE": str(hub / "hub"), "HF_HUB_OFFLINE": "1",
           "STAINCTL_MODELS": str(hub / "models")}
    ws = str(tmp_path / "ws")
    assert _run("tile", str(cmu1_path), "-w", ws, "-q", env=env).returncode == 0
    assert _run("filter", "-w", ws, "-q", env=env).returncode == 0
    r = _run("embed", "-w", ws, "--encoder", "uni2-h", env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert "uni2-h" in r.stderr and "pytorch_model.bin" in r.stderr
    assert "stainctl models pull uni2-h" in r.stderr
    r = _run("models", "pull", "lunit-dino-vits16", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "could not download" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_models_add_list_show(cli, hub, tmp_path):
    card = tiny_card(tmp_path / "cards")
    weights = save_weights(card, tmp_path / "w" / "pytorch_model.bin")
    models = hub / "models"
    r = cli("models", "list", "--json")
    row = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    assert "tiny-uni2h" not in row and row["uni2-h"]["installed"] is False
    assert cli("models", "add", card, "--weights", weights).exit_code == 0
    assert (models / "tiny-uni2h" / "card.toml").exists()
    row = {m["name"]: m for m in json.loads(cli("models", "list", "--json").stdout)["models"]}
    assert row["tiny-uni2h"]["installed"] is True
    shown = json.loads(cli("models", "show", "tiny-uni2h", "--json").stdout)
    assert shown["files"][0]["where"] == "models dir"
    assert cli("models", "show", "nope").exit_code == 2


# --- encoders -----------------------------------------------------------------------------
@pytest.mark.slow
def test_torchvision_shim_and_its_absence(monkeypatch):
    import importlib.util

    code = ("from stainctl.models.torch_compat import prepare_torchvision as p; p(); "
            "import timm, torchvision.transforms; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True).stdout.strip() == "ok"
    import stainctl.models.torch_compat as tc

    monkeypatch.setattr(tc, "_library", None)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install -c constraints\.txt torchvision"):
        tc.prepare_torchvision()


def test_tile_grid_tokens_come_in_row_order(hub, tmp_path):
    install_tiny(hub / "models", tmp_path)
    encoder = load_encoder(get_card("tiny-uni2h", hub / "models"), hub / "models",
                           device="cpu")
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 60, (1, 512, 512, 3), np.uint8)
    tile[:, :256, 256:, 0] += 190  # quadrants of different colours
    tile[:, 256:, :256, 1] += 190
    tile[:, 256:, 256:] += 120
    tokens = encoder.encode(tile)
    assert tokens.shape == (1, 4, 48) and encoder.tokens_per_tile(512) == 4
    for index, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        alone = encoder.encode(np.ascontiguousarray(tile[:, y:y + 256, x:x + 256]))
        assert torch.allclose(tokens[0, index], alone[0, 0], atol=1e-4), index
    # Quadrants that differ give different tokens (the test above could not pass by accident).
    for a in range(4):
        for b in range(a + 1, 4):
            assert (tokens[0, a] - tokens[0, b]).abs().max() > 0.05, (a, b)
    bf16 = TileEncoder("b", encoder.spec, encoder.network, 0.5, "cpu", "bf16").encode(tile)
    assert torch.allclose(bf16, tokens, atol=0.1, rtol=0.05)
    with pytest.raises(ModelError, match=r"whole number"):
        encoder.tokens_per_tile(300)


def test_dense_patch_tokens_of_uni_shape():
    spec = EncoderSpec.from_card(get_card("uni"))
    tiny = replace(spec, input_size=64, timm_kwargs={**spec.timm_kwargs, "img_size": 64,
                                                      "depth": 1, "num_heads": 2,
                                                      "embed_dim": 32})
    encoder = TileEncoder("u", tiny, build_network(tiny), 0.5)
    out = encoder.encode(np.zeros((2, 512, 512, 3), np.uint8))
    assert out.shape == (2, 4 * 16, 32) == (2, encoder.tokens_per_tile(512), encoder.dim)


def test_weights_that_do_not_fit_the_card_are_named(hub, tmp_path):
    install_tiny(hub / "models", tmp_path)
    torch.save({"nonsense": torch.ones(1)}, hub / "models" / "tiny-uni2h" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="does not fit the card"):
        load_encoder(get_card("tiny-uni2h", hub / "models"), hub / "models", device="cpu")


def test_pull_of_a_gated_model_says_how_to_get_access(hub, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from stainctl.models.weights import pull

    real = huggingface_hub.hf_hub_download

    def gated(repo, filename, **kwargs):
        if kwargs.get("local_files_only"):  # the cache lookup before downloading
            return real(repo, filename, **kwargs)
        response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co"))
        raise GatedRepoError(f"{repo} is gated", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ModelError, match=r"huggingface\.co/MahmoodLab/UNI2-h.*HF_TOKEN"):
        pull(get_card("uni2-h"), hub / "models")
