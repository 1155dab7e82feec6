"""pixcell `--structure S`: HistDiST's inversion recipe on PixCell, with the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pixcell_helpers import cmu1_tiles, install_pixcell, tiny_engine


@pytest.fixture
def models(use_models):
    return use_models(install_pixcell)


def test_small_structure_stays_close_to_the_vae_round_trip(models):
    from stainctl.engines.pixcell.sampling import decode_latents, encode_latents

    tiles = cmu1_tiles(2)
    plain = tiny_engine(models, 20)
    vae = plain.parts.vae
    round_trip = decode_latents(vae, encode_latents(vae, torch.from_numpy(tiles), torch.float32),
                                torch.float32).numpy().astype(int)
    ordinary = plain.translate(tiles, [3, 4]).astype(int)
    far = np.abs(ordinary - round_trip).mean()
    small = tiny_engine(models, 20, structure=0.05).translate(tiles, [3, 4]).astype(int)
    middle = tiny_engine(models, 20, structure=0.5).translate(tiles, [3, 4]).astype(int)
    assert far > 20  # generation from noise is not the input tile
    assert np.abs(small - round_trip).mean() < far / 20
    assert np.abs(small - round_trip).mean() < np.abs(middle - round_trip).mean() < far


def test_structure_one_is_ordinary_generation_with_the_same_seed(models):
    tiles = cmu1_tiles(2)
    ordinary = tiny_engine(models, 20).translate(tiles, [3, 4])
    structured = tiny_engine(models, 20, structure=1.0).translate(tiles, [3, 4])
    assert np.array_equal(structured, ordinary)


def test_structure_with_eta_is_seeded_per_tile_and_recorded(models):
    tiles = cmu1_tiles(2)
    engine = tiny_engine(models, 20, structure=0.5, eta="cosine-20")
    out = engine.translate(tiles, [3, 4])
    assert np.array_equal(engine.translate(tiles, [3, 4]), out)
    assert not np.array_equal(engine.translate(tiles, [3, 5])[1], out[1])
    assert engine.settings()["structure"] == 0.5 and engine.settings()["eta"] == "cosine-20"
    assert "structure" not in tiny_engine(models, 20).settings()  # older stores stay valid


def test_structure_out_of_range_is_a_usage_error(cli, tmp_path, cmu1_path):
    r = cli("translate", cmu1_path, "--structure", "0", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--structure must be in (0, 1]" in r.stderr
