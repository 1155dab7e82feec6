"""The `fast` generator: size, shapes, determinism on real tiles, marker and token conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stainctl.engines.fast.model import FastConfig, FastGenerator, build, parameter_count
from stainctl.slide.reader import open_slide


@pytest.fixture(scope="module")
def he_tiles(cmu1_path) -> torch.Tensor:
    """Four real 512-px H&E tiles from CMU-1, scaled to [-1, 1]."""
    slide = open_slide(cmu1_path)
    tiles = [slide.read_region(x, y, 0, 512, 512) for x, y in
             [(600, 800), (1100, 800), (600, 1400), (1100, 1900)]]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x


def test_size_and_shapes(he_tiles):
    model = build(["ki67", "her2", "ck7"]).eval()
    assert parameter_count(model) <= 15_000_000
    with torch.inference_mode():
        out = model(he_tiles, torch.tensor([0, 1, 2, 0]))
    # (Its range needs no check: the output is a tanh.) An untrained generator adds a small
    # residual to its input, so it starts from the H&E instead of from noise.
    assert out.shape == he_tiles.shape and torch.isfinite(out).all()
    assert (out - torch.tanh(he_tiles)).abs().mean() < 0.1
    with pytest.raises(KeyError, match="no marker 'pr'"):
        model.marker_index("pr")


def test_cpu_inference_on_real_tiles_is_deterministic(he_tiles):
    torch.manual_seed(3)
    model = FastGenerator(FastConfig(markers=("ki67",))).eval()
    markers = torch.zeros(len(he_tiles), dtype=torch.long)
    with torch.inference_mode():
        a = model(he_tiles, markers)
        b = model(he_tiles, markers)
        one = model(he_tiles[1:2], markers[1:2])
    assert torch.equal(a, b)
    # A tile's output does not depend on the other tiles of its batch (no batch statistics).
    assert torch.allclose(a[1:2], one, atol=1e-5)


def test_marker_and_tokens_condition_the_output(he_tiles):
    torch.manual_seed(0)
    model = build(["ki67", "her2"], token_dim=16).eval()
    x = he_tiles[:2]
    tokens = torch.randn(2, 4, 16)
    with torch.no_grad():
        # FiLM and SPADE start as identities (zero init); give them weights as training would.
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.5)
        ki67 = model(x, torch.tensor([0, 0]), tokens)
        her2 = model(x, torch.tensor([1, 1]), tokens)
        untokened = model(x, torch.tensor([0, 0]))
    assert (ki67 - her2).abs().mean() > 1e-3
    assert (ki67 - untokened).abs().mean() > 1e-3
