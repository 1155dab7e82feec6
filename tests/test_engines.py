"""The engine protocol and registry: an engine registered here runs through translate without
any change to steps/."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from stainctl.engines.base import (
    Engine,
    EngineOptions,
    EngineSpec,
    engine_spec,
    load_engine,
    register,
    unregister,
)
from stainctl.errors import ModelError, UsageError
from stainctl.models.card import ModelCard

TOY_CARD = """
name = "toy-ki67"
kind = "marker"
engine = "toy"
marker = "ki67"
input_mpp = 0.5
tile_size = 256
licence = "test"
intended_use = "tests"
training_data = "none"

[architecture]
margin = 16
"""


class ToyEngine:
    """Inverts the tile: no torch, no weights; counts what it was asked to do."""

    input_side: int | None = None
    multiple = 8
    deterministic = True

    def __init__(self, card: ModelCard, options: EngineOptions) -> None:
        import torch

        self.card, self.options = card, options
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.margin = int(card.architecture["margin"])
        self.calls: list[tuple[tuple[int, ...], list[int]]] = []
        self.closed = False

    def settings(self) -> Mapping[str, object]:
        return {"invert": True}

    def translate(self, tiles: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        self.calls.append((tiles.shape, list(seeds)))
        return 255 - tiles

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def toy(use_models):
    loaded: list[ToyEngine] = []

    def loader(card: ModelCard, directory: Path, options: EngineOptions) -> Engine:
        loaded.append(ToyEngine(card, options))
        return loaded[-1]

    register(EngineSpec(name="toy", loader=loader))

    def install(directory: Path) -> None:
        (directory / "toy-ki67").mkdir(parents=True)
        (directory / "toy-ki67" / "card.toml").write_text(TOY_CARD)

    yield use_models(install), loaded
    unregister("toy")


def test_a_registered_engine_runs_through_the_main_job(cli, tmp_path, toy, cmu1_path):
    _, loaded = toy
    r = cli("translate", cmu1_path, "--marker", "toy-ki67", "-o", tmp_path / "out", "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["slides"][0]["state"] == "done"
    (engine,) = loaded
    assert engine.options.device == "cpu" and engine.closed
    shapes = {shape for shape, _ in engine.calls}
    assert shapes and all(s[1:] == (256 + 2 * 16, 256 + 2 * 16, 3) for s in shapes)
    assert all(len(seeds) == shape[0] for shape, seeds in engine.calls)
    out = tmp_path / "out" / "CMU-1-Small-Region.toy-ki67.ome.tiff"
    assert out.exists()
    import tiffslide

    slide = tiffslide.TiffSlide(out)
    img = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    assert (img.mean(axis=2) < 60).mean() > 0.05  # inverted glass inside tissue tiles is dark

    # Its settings are part of what the tiles were made with: the same run is skipped.
    again = cli("translate", cmu1_path, "--marker", "toy-ki67", "-o", tmp_path / "out", "--json")
    assert json.loads(again.stdout)["slides"][0]["state"] in ("done", "skipped")
    assert len(loaded) == 2 and not loaded[1].calls


def test_registering_imports_no_torch_and_unknown_engines_say_what_exists():
    code = ("import sys; import stainctl.engines.base as b; "
            "assert 'torch' not in sys.modules; print(sorted(b._ENGINES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "fast" in out and "pixcell" in out
    card = ModelCard(name="x", kind="marker", engine="nope", input_mpp=0.5, tile_size=256,
                     licence="", intended_use="", training_data="", marker="ki67")
    with pytest.raises(ModelError, match=r"'nope' engine.*it has: fast, histdist, pixcell"):
        load_engine(card, Path("."), EngineOptions())


def test_a_fixed_side_engine_tiles_at_its_side_less_the_overlaps():
    card = ModelCard(name="p", kind="marker", engine="pixcell", input_mpp=0.5, tile_size=1024,
                     licence="", intended_use="", training_data="", marker="ck7")
    spec = engine_spec(card)
    assert spec.grid_tile_size(card, None) == 1024 - 2 * 64
    assert spec.grid_tile_size(card, 0) == 1024
    with pytest.raises(UsageError, match="--overlap must be between 0 and 256"):
        spec.grid_tile_size(card, 300)
    fast = ModelCard(name="f", kind="marker", engine="fast", input_mpp=0.5, tile_size=512,
                     licence="", intended_use="", training_data="", marker="ki67")
    assert engine_spec(fast).grid_tile_size(fast, 100) == 512


def test_engine_options_check_themselves():
    with pytest.raises(UsageError, match="--steps"):
        EngineOptions(steps=0)
    with pytest.raises(UsageError, match="--dtype"):
        EngineOptions(dtype="fp8")
