"""`evaluate --metrics mra` (HistDiST's Molecular Retrieval Accuracy) and the GigaPath card."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import _folder, _tiles

from stainctl.evaluate.evaluator import EvaluateOptions, evaluate
from stainctl.evaluate.retrieval import mra, mra_of_pairs, retrieval_ranks
from stainctl.evaluate.sources import read_image

TINY_GIGAPATH = """
name = "tiny-gigapath"
kind = "encoder"
engine = "timm"
input_mpp = 0.5
tile_size = 256
licence = "test"
intended_use = "tests"
training_data = "none: random weights"

[architecture]
family = "center-crop"
timm_model = "vit_giant_patch14_dinov2"
crop = 72
input_size = 64
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[architecture.timm_kwargs]
img_size = 64
patch_size = 16
embed_dim = 32
depth = 1
num_heads = 4
init_values = 1.0
mlp_ratio = 5.33334
num_classes = 0
global_pool = "token"

[[weights]]
role = "encoder"
path = "pytorch_model.bin"
"""


def test_ranks_follow_the_authors_definition():
    real = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert list(retrieval_ranks(real, real)) == [0, 0, 0]
    fake = real[[1, 0, 2]]  # the first two swapped
    assert list(retrieval_ranks(real, fake)) == [2, 2, 0]  # [1, 1] is between them
    m = mra(real, fake)
    assert m["top1"] == pytest.approx(1 / 3) and m["top3"] == 1.0
    assert m["chance_top1"] == pytest.approx(1 / 3) and m["chance_top3"] == 1.0


def test_real_images_are_embedded_once_across_generated_sets():
    class Item:
        def __init__(self, key: str, value: float) -> None:
            self.key, self.value = key, value

        def load(self) -> np.ndarray:
            return np.full((4, 4, 3), self.value, np.uint8)

    calls: list[float] = []

    def features(batch: np.ndarray) -> np.ndarray:
        calls.append(float(batch[0, 0, 0, 0]))
        return np.array([[float(batch[0, 0, 0, 0]), 1.0]])

    real = [Item("a", 10), Item("b", 200)]
    cache: dict[str, np.ndarray] = {}
    first = mra_of_pairs([(real[0], Item("a", 10)), (real[1], Item("b", 200))], features, cache)
    second = mra_of_pairs([(real[0], Item("a", 200)), (real[1], Item("b", 10))], features, cache)
    assert calls.count(10) + calls.count(200) == 6  # 2 real + 2 x 2 generated, not 8
    assert sorted(cache) == ["a", "b"]
    assert first["top1"] == 1.0 and second["top1"] == 0.0  # the cache keeps the real images'


def test_unrelated_pairs_score_at_chance():
    rng = np.random.default_rng(0)
    n, trials = 40, 200
    top1 = [mra(rng.normal(size=(n, 16)), rng.normal(size=(n, 16)))["top1"]
            for _ in range(trials)]
    top3 = [mra(rng.normal(size=(n, 16)), rng.normal(size=(n, 16)))["top3"]
            for _ in range(trials)]
    assert np.mean(top1) == pytest.approx(1 / n, abs=0.01)
    assert np.mean(top3) == pytest.approx(3 / n, abs=0.02)
    # Generated embeddings near their own real ones are retrieved.
    real = rng.normal(size=(n, 16))
    assert mra(real, real + 0.1 * rng.normal(size=real.shape))["top1"] == 1.0


@pytest.fixture
def tiny_gigapath(tmp_path, monkeypatch):
    from stainctl.models.card import load_card
    from stainctl.models.encoders import EncoderSpec, build_network

    models = tmp_path / "models"
    target = models / "tiny-gigapath"
    target.mkdir(parents=True)
    (target / "card.toml").write_text(TINY_GIGAPATH)
    torch.manual_seed(0)
    net = build_network(EncoderSpec.from_card(load_card(target / "card.toml")))
    torch.save(net.state_dict(), target / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return models


def test_mra_is_one_for_a_set_against_itself_and_low_for_shuffled_pairs(tmp_path, tiny_gigapath,
                                                                         ki67_ome_paths):
    image = read_image(ki67_ome_paths[0])[:1024, :1024]
    real = _folder(tmp_path / "real", _tiles(image, 256))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    names = sorted(p.name for p in real.iterdir())
    for a, b in zip(names, names[3:] + names[:3], strict=True):  # every pair is another tile
        shutil.copyfile(real / a, shuffled / b)
    ev = evaluate(EvaluateOptions(real=real, fakes=(real, shuffled), metrics=("mra",),
                                  encoder="tiny-gigapath", models_dir=tiny_gigapath,
                                  device="cpu"))
    same, wrong = (f.metrics["mra"] for f in ev.fakes)
    assert same["pairs"] == 16 and same["top1"] == 1.0 and same["top3"] == 1.0
    assert same["chance_top1"] == pytest.approx(1 / 16)
    assert wrong["top1"] <= 2 * wrong["chance_top1"]


def test_mra_needs_an_encoder(cli, tmp_path):
    r = cli("evaluate", "--real", tmp_path, "--fake", tmp_path, "--metrics", "mra")
    assert r.exit_code == 2 and "mra needs --encoder" in r.stderr


def test_gigapath_card_is_the_published_architecture_and_transform():
    from stainctl.models.encoders import EncoderSpec, TileEncoder, build_network
    from stainctl.models.registry import get_card

    card = get_card("gigapath", Path("/nonexistent"))
    spec = EncoderSpec.from_card(card)
    assert (spec.family, spec.crop, spec.input_size) == ("center-crop", 256, 224)
    assert card.weight("encoder").repo == "prov-gigapath/prov-gigapath"
    with torch.device("meta"):
        net = build_network(spec)
    assert 1.1e9 < sum(p.numel() for p in net.parameters()) < 1.2e9
    assert net.patch_embed.patch_size == (16, 16) and net.num_features == 1536
    # Resize the shorter side to 256, centre-crop 224: a 512 x 1024 image keeps its middle.
    identity = torch.nn.Identity()
    identity.num_features = 3
    enc = TileEncoder("g", spec, identity, 0.5)
    img = np.zeros((1, 512, 1024, 3), np.uint8)
    img[:, :, 384:640] = 255  # a bright band in the middle quarter
    x = enc.crops(img)
    assert x.shape == (1, 3, 224, 224)
    assert float(x[0, 0, :, 112].min()) > 1.5 and float(x[0, 0, :, 0].max()) < -1.5
