"""`translate`: the main job on the real CMU-1 sample with a fast model, and its training code."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from models_helpers import install_fast

from stainctl.engines.fast.data import load_image


@pytest.fixture
def models(use_models):
    return use_models(install_fast)


@pytest.mark.slow
def test_main_job_writes_a_virtual_slide_over_the_tissue(cli, tmp_path, models, cmu1_path):
    import tiffslide

    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "test-ki67", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    details = json.loads(r.stdout)["slides"][0]["details"]
    path = Path(details["output"])
    assert path == out.resolve() / "CMU-1-Small-Region.test-ki67.ome.tiff"
    assert Path(details["side_by_side"]).exists()
    slide = tiffslide.TiffSlide(path)
    # 0.5 µm/px is within 1 % of the sample's 0.499: the grid is on its own pixels (issue 21).
    assert slide.dimensions == (2220, 2967)
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5, rel=0.01)
    img = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))

    # Tissue (from the workspace's own mask) is generated, not background; glass is background.
    mask = cv2.imread(str(out / "workspace" / "slides" / "CMU-1-Small-Region" /
                          "tissue_mask.png"), cv2.IMREAD_GRAYSCALE)
    mask = cv2.resize(mask, slide.dimensions, interpolation=cv2.INTER_NEAREST) > 0
    far_glass = cv2.erode((~mask).astype(np.uint8), np.ones((301, 301), np.uint8)) > 0
    # The fill of untranslated tiles: the colour this model gives the slide's glass.
    from stainctl.workspace.tilestore import TileStore

    store = TileStore.open(out / "workspace" / "slides" / "CMU-1-Small-Region" / "translated" /
                           "test-ki67.zarr", writable=False)
    background = np.array(store.meta["background"])
    # Glass is the background colour, or near it where a tissue tile's own glass was generated.
    assert far_glass.mean() > 0.2
    assert np.abs(img[far_glass].astype(int) - background).mean() < 8
    assert np.abs(img[mask].astype(int) - background).mean() > 20

    again = json.loads(cli("translate", cmu1_path, "--marker", "ki67", "-o", out, "--json").stdout)
    # The stain name finds the installed model, whose slide is made already.
    assert again["slides"][0]["state"] == "skipped"
    assert again["slides"][0]["details"]["output"] == str(path)

    # A rerun with nothing to do says so in every line: no "to do", each step skips the slide.
    r = cli("translate", cmu1_path, "--marker", "test-ki67", "-o", out)
    assert r.exit_code == 0
    steps = [line.split(" INFO ")[1] for line in r.stderr.splitlines() if " INFO " in line]
    assert [s.split(":")[0] for s in steps] == ["tile", "filter", "translate", "stitch"]
    assert all(": CMU-1-Small-Region: skipped (" in s for s in steps), steps
    assert r.stdout.splitlines()[0] == ("translate: nothing to do, 1 slide(s) already done "
                                        "(--force redoes them)")


@pytest.mark.slow
def test_translate_resumes_with_missing_tiles(cli, tmp_path, models, cmu1_path):
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
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
    sid = w.manifest.slides()[0].id
    # Every tissue tile is translated, also those the filter rejected, and the line says so.
    assert total == len(w.manifest.tissue_tiles(sid)) > len(w.manifest.kept_tiles(sid))
    assert "those the filter rejected too" in first["slides"][0]["message"]
    row = w.manifest.step(sid, "translate:test-ki67")
    assert row is not None
    w.manifest.set_step(sid, "translate:test-ki67", "running", params_hash=row.params_hash,
                        params=row.params)
    w.close()
    again = json.loads(cli("translate", "-w", ws, "--marker", "test-ki67", "--json").stdout)
    assert again["slides"][0]["details"]["translated_now"] == 2
    assert again["slides"][0]["details"]["tiles"] == total


def test_main_job_leaves_out_a_fluorescence_slide_with_a_reason_it_can_act_on(cli, tmp_path,
                                                                             models, he_ome_path,
                                                                             dapi_path):
    r = cli("translate", he_ome_path, dapi_path, "--marker", "test-ki67", "-o", tmp_path / "out",
            "--json")
    assert r.exit_code == 1  # one slide done, one failed
    slides = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    assert slides["OS-1-detail_HE"]["state"] == "done"
    message = slides["test3-DAPI-2-387"]["message"]
    assert "fluorescence" in message and "left out" in message
    assert "--allow-dark" not in message  # translate has no such option


def test_unknown_marker_lists_what_is_installed(cli, tmp_path, models, cmu1_path):
    r = cli("translate", cmu1_path, "--marker", "ck7", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "no model makes 'ck7'" in r.stderr and "test-ki67 (ki67)" in r.stderr
    assert "stainctl models add" in r.stderr


def test_engine_output_is_deterministic_on_real_tiles(models, cmu1_path):
    from stainctl.engines.base import EngineOptions, load_engine
    from stainctl.models.registry import get_card

    engine = load_engine(get_card("test-ki67", models), models, EngineOptions(device="cpu"))
    tiles = np.stack([cv2.resize(load_image(cmu1_path, 0.5)[800:1376, 400:976], (576, 576))] * 2)
    a, again = engine.translate(tiles, [0, 1]), engine.translate(tiles, [0, 1])
    alone = engine.translate(tiles[:1], [0])
    assert a.shape == tiles.shape and a.dtype == np.uint8
    assert np.array_equal(a, again) and np.array_equal(a[0], a[1])
    # Another batch size may pick other CPU kernels: at most a rounding step apart.
    assert np.abs(a[0].astype(int) - alone[0]).max() <= 1
    assert np.abs(a[0].astype(int) - tiles[0]).mean() > 5  # it did change the image


def test_fast_engine_gpu_layout_and_reduced_precision_give_the_same_tiles(models, cmu1_path):
    """The GPU path (channels-last network, NHWC in and out without host transposes) and an
    asked-for bf16, run here on the CPU: the same tiles as the shipped fp32 layout, up to
    rounding."""
    import torch

    from stainctl.engines.base import EngineOptions, load_engine
    from stainctl.models.registry import get_card

    card = get_card("test-ki67", models)
    tiles = np.stack([load_image(cmu1_path, 0.5)[y:y + 576, 400:976] for y in (300, 700)])
    plain = load_engine(card, models, EngineOptions(device="cpu"))
    assert plain.dtype == torch.float32 and not plain.channels_last  # auto: fp32 on any device
    ref = plain.translate(tiles, [0, 1])
    gpu_like = load_engine(card, models, EngineOptions(device="cpu"))
    gpu_like.generator.to(memory_format=torch.channels_last)
    gpu_like.channels_last = True
    out = gpu_like.translate(tiles, [0, 1])
    assert out.shape == tiles.shape and out.flags.c_contiguous
    assert np.abs(out.astype(int) - ref).max() <= 1
    half = load_engine(card, models, EngineOptions(device="cpu", dtype="bf16"))
    assert half.dtype == torch.bfloat16
    # Its pixels differ, so its tiles are recorded apart (a change makes the slide again).
    assert plain.settings() == {} and half.settings() == {"dtype": "bfloat16"}
    diff = np.abs(half.translate(tiles, [0, 1]).astype(int) - ref)
    assert 0 < diff.mean() < 3  # it ran in bf16 (not bit-identical) and stays close


def test_batch_size_and_readers_default_to_what_suits_the_engine_where_it_runs(models,
                                                                              monkeypatch):
    """Unset, --batch-size and --readers come from the engine's shape: 8 and 2 on a CPU; on a
    GPU the fast engine's 64 (measured 1.7x the engine's throughput at 8 on an H200) and more
    readers. Given, they win; below 1 they are refused."""
    import torch

    from stainctl.engines.base import EngineOptions, EngineShape, load_engine
    from stainctl.errors import UsageError
    from stainctl.models.registry import get_card
    from stainctl.steps.translate import TranslateOptions

    engine = load_engine(get_card("test-ki67", models), models, EngineOptions(device="cpu"))
    cpu = EngineShape.of(engine)
    assert (cpu.batch_size, cpu.readers) == (8, 2)
    engine.device = torch.device("cuda")  # the shape only reads where it runs
    gpu = EngineShape.of(engine)
    assert gpu.batch_size == 64 and 2 <= gpu.readers <= 8
    # The readers follow the cores this process may use (a cpuset), not the host's.
    monkeypatch.setattr("stainctl.cluster.pin.available_cores", lambda: (0, 1, 2))
    assert EngineShape.of(engine).readers == 3
    options = TranslateOptions(marker="test-ki67")
    assert options.batch_size is None and options.readers is None
    assert TranslateOptions(marker="test-ki67", batch_size=3).batch_size == 3
    for bad in ({"batch_size": 0}, {"readers": 0}):
        with pytest.raises(UsageError, match="at least 1"):
            TranslateOptions(marker="test-ki67", **bad)


def test_writer_threads_are_counted_where_the_tiles_are_translated(tmp_path, cmu1_path,
                                                                   monkeypatch):
    """A shard made on the driver leaves its writer count to the worker: counted on the driver,
    a 2-core login node would give a 16-core GPU worker 2 writers."""
    import concurrent.futures

    import stainctl.steps.translate_work as work
    from stainctl.slide.tiles import TileSource
    from stainctl.workspace.tilestore import StoreLayout, TileStore

    assert work.ShardTask.__dataclass_fields__["writers"].default is None
    pools: list[int] = []

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, workers, **kwargs):
            pools.append(workers)
            super().__init__(workers, **kwargs)

    class Identity:
        def translate(self, tiles, seeds):
            return tiles.copy()

    monkeypatch.setattr(work, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(work, "io_threads", lambda: 3)  # this process's cores
    store = TileStore.create(tmp_path / "s.zarr", StoreLayout(512, 256, 0.5, 2, 1, 256, 0, 0),
                             {"model": "identity"})
    tiles = np.array([[0, 0, 0, 0], [1, 0, 256, 0]], np.int64)
    for writers, expected in ((None, 3), (5, 5)):
        n = work.translate_tiles(Identity(), TileSource(str(cmu1_path), 256, 256), store, tiles,
                                 present=np.zeros(2, bool), slide_key="s", margin0=0.0, seed=0,
                                 batch_size=2, readers=1, writers=writers)
        assert n == 2 and pools[-1] == expected
    assert store.written().sum() == 2


@pytest.mark.slow
def test_the_shipped_model_stains_tissue_and_leaves_glass_alone(tmp_path, cmu1_path):
    from stainctl.engines.fast.engine import load_fast_engine
    from stainctl.models.registry import get_card

    he = load_image(cmu1_path, 0.5)
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




def test_the_engine_is_closed_when_there_is_nothing_to_translate(tmp_path, monkeypatch):
    from stainctl.errors import UsageError
    from stainctl.steps import translate
    from stainctl.workspace import Workspace

    closed: list[bool] = []
    real = translate.load_engine

    def tracked(*args, **kwargs):
        engine = real(*args, **kwargs)
        monkeypatch.setattr(engine, "close", lambda: closed.append(True))
        return engine

    monkeypatch.setattr(translate, "load_engine", tracked)
    ws = Workspace.open(tmp_path / "ws", create=True)
    with pytest.raises(UsageError, match="no slide has been filtered"):
        translate.translate_slides(ws, translate.TranslateOptions(marker="demo-ki67"))
    assert closed == [True]
