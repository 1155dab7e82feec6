"""Typed manifest records: round trips through SQLite, named queries on a real workspace, and
the rule that SQL lives in `workspace/` only."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import ROOT

from stainctl.workspace import (
    ArtifactRecord,
    GridRecord,
    SlideRecord,
    StepRecord,
    TileCell,
    TileRecord,
    Workspace,
)


def test_records_round_trip(tmp_path):
    ws = Workspace.open(tmp_path, create=True)
    m = ws.manifest
    slide = m.add_slide("/data/a.svs", "a", "fp0")
    assert isinstance(slide, SlideRecord)
    assert (slide.key, slide.path, slide.fingerprint, slide.mpp) == ("a", "/data/a.svs", "fp0",
                                                                     None)
    assert m.add_slide("/data/a.svs", "a", "other") == slide  # known path: the same record
    assert m.add_slide("/elsewhere/a.svs", "a", "fp1").key == "a-2"  # keys stay unique

    m.describe_slide(slide.id, fingerprint="fp9", backend="openslide", vendor="aperio",
                     width=2220, height=2967, levels='{"dimensions": [[2220, 2967]]}', mpp=0.499,
                     mpp_source="metadata", objective_power=20.0)
    described = m.slide_by_key("a")
    assert described == dataclasses.replace(slide, fingerprint="fp9", backend="openslide",
                                            vendor="aperio", width=2220, height=2967,
                                            levels='{"dimensions": [[2220, 2967]]}', mpp=0.499,
                                            mpp_source="metadata", objective_power=20.0)
    assert m.slide_by_path("/data/a.svs") == described and m.slide_by_key("zz") is None

    grid = GridRecord(slide_id=slide.id, params_hash="h1", target_mpp=0.5, tile_size=256,
                      overlap=0, extent0=256.5, stride0=256.5, cols=2, rows=2, min_tissue=0.25)
    cells = [TileCell(col=c, row=r, x=c * 256, y=r * 256, tissue=0.1 + 0.2 * (2 * r + c),
                      in_tissue=(2 * r + c) >= 2) for r in range(2) for c in range(2)]
    m.replace_grid(grid, cells)
    assert m.grid(slide.id) == grid
    tiles = m.tiles(slide.id)
    assert all(isinstance(t, TileRecord) for t in tiles)
    assert [(t.col, t.row, t.x, t.y, t.in_tissue) for t in tiles] == [
        (c.col, c.row, c.x, c.y, c.in_tissue) for c in cells]
    assert [t.tissue for t in tiles] == pytest.approx([c.tissue for c in cells])
    assert all(t.keep is None and t.laplacian_var is None for t in tiles)  # not judged yet
    assert [(t.col, t.row) for t in m.tissue_tiles(slide.id)] == [(0, 1), (1, 1)]

    m.store_metrics([(tiles[2].id, 300.0, 0.5, 0.1), (tiles[3].id, 10.0, 0.5, 0.1)])
    m.judge_tiles(slide.id, 100.0, 0.1, 0.6)
    kept = m.kept_tiles(slide.id)
    assert [t.id for t in kept] == [tiles[2].id]
    assert kept[0].keep is True and kept[0].laplacian_var == 300.0
    assert m.tiles(slide.id)[3].keep is False

    m.set_step(slide.id, Workspace.FILTER, "running", params_hash="p1",
               params={"min_laplacian": 100.0, "nested": {"a": [1, 2]}}, run_id=None)
    step = m.step(slide.id, Workspace.FILTER)
    assert isinstance(step, StepRecord)
    assert (step.state, step.params_hash, step.finished) == ("running", "p1", None)
    assert step.params == {"min_laplacian": 100.0, "nested": {"a": [1, 2]}}
    assert not step.done and not step.done_with("p1")
    m.set_step(slide.id, Workspace.FILTER, "done", params_hash="p1", params=step.params)
    done = m.step(slide.id, Workspace.FILTER)
    assert done is not None and done.done_with("p1") and not done.done_with("p2")
    assert done.started == step.started and done.finished is not None
    assert m.slides_done(Workspace.FILTER) == [described]
    assert m.step(slide.id, Workspace.embed_step("uni2-h")) is None

    m.record_artifact(slide.id, "thumbnail", "slides/a/thumbnail.png")
    m.record_artifact(slide.id, "tile_store", "slides/a/translated/m.zarr", "p1")
    (store,) = m.artifacts(slide.id, "tile_store")
    assert isinstance(store, ArtifactRecord)
    assert (store.path, store.params_hash, store.stale) == ("slides/a/translated/m.zarr", "p1",
                                                            False)
    m.replace_grid(grid, cells)  # a new grid: what was made from the old one goes stale
    assert m.artifacts(slide.id, "tile_store") == []
    assert [a.path for a in m.artifacts(slide.id, "thumbnail")] == ["slides/a/thumbnail.png"]
    assert m.step(slide.id, Workspace.FILTER) is None  # and its steps are forgotten

    with ws.writing("filter", {"force": True, "path": Path("/x")}):
        pass
    (run,) = m.runs()
    assert (run.command, run.outcome, run.params) == ("filter", "ok",
                                                      {"force": True, "path": "/x"})
    assert run.ended is not None and "numpy" in run.versions


def test_step_names_and_paths_come_from_the_workspace(tmp_path):
    ws = Workspace.open(tmp_path, create=True)
    assert (ws.embed_step("uni2-h"), ws.translate_step("demo-ki67"), ws.stitch_step("ki67")) == (
        "embed:uni2-h", "translate:demo-ki67", "stitch:ki67")
    root = ws.root
    assert ws.thumbnail_path("s") == root / "slides" / "s" / "thumbnail.png"
    assert ws.tissue_mask_path("s") == root / "slides" / "s" / "tissue_mask.png"
    files = ws.embedding_files("s", "uni2-h")
    assert (files.tokens, files.ids) == (root / "slides/s/embeddings/uni2-h.npy",
                                         root / "slides/s/embeddings/uni2-h.tiles.npy")
    assert ws.tile_store_path("s", "m") == root / "slides" / "s" / "translated" / "m.zarr"
    assert ws.output_path("s", "m", ".ome.tiff") == root / "outputs" / "s.m.ome.tiff"
    assert ws.output_path("s", "m", ".tif", tmp_path / "o") == tmp_path / "o" / "s.m.tif"


@pytest.fixture(scope="module")
def cmu1_workspace(tmp_path_factory, cmu1_path) -> Path:
    from stainctl.slide.grid import GridParams
    from stainctl.slide.inputs import SlideRequest
    from stainctl.steps.filter import FilterOptions, filter_slides
    from stainctl.steps.tile import TileOptions, tile_slides

    root = tmp_path_factory.mktemp("cmu1")
    ws = Workspace.open(root, create=True)
    tile_slides(ws, [SlideRequest(cmu1_path)], TileOptions(grid=GridParams(tile_size=256)))
    filter_slides(ws, FilterOptions())
    ws.close()
    return root


def test_named_queries_on_a_real_workspace(cmu1_workspace, cmu1_path):
    ws = Workspace.open(cmu1_workspace)
    db = sqlite3.connect(cmu1_workspace / "manifest.sqlite")
    (slide,) = ws.manifest.slides()
    assert slide.path == str(cmu1_path) and slide.vendor == "aperio"
    assert slide.width == 2220 and slide.height == 2967 and slide.mpp == pytest.approx(0.499)
    assert ws.manifest.slides_done(Workspace.TILE) == ws.manifest.slides_done(Workspace.FILTER)
    assert ws.manifest.slides_done(ws.translate_step("demo-ki67")) == []

    # The same tiles as the SQL they replace, in raster order (row, then column).
    kept = [(t.id, t.x, t.y) for t in ws.manifest.kept_tiles(slide.id)]
    assert kept == db.execute("SELECT id, x, y FROM tiles WHERE slide_id=? AND keep=1 "
                              "ORDER BY row, col", (slide.id,)).fetchall()
    tissue = [(t.col, t.row, t.x, t.y) for t in ws.manifest.tissue_tiles(slide.id)]
    assert tissue == db.execute("SELECT col, row, x, y FROM tiles WHERE slide_id=? AND "
                                "in_tissue=1 ORDER BY row, col", (slide.id,)).fetchall()
    assert 0 < len(kept) < len(tissue) < len(ws.manifest.tiles(slide.id))
    assert all(t.keep for t in ws.manifest.kept_tiles(slide.id))

    grid = ws.manifest.grid(slide.id)
    # 0.5 µm/px is within 1 % of the sample's 0.499: the grid records level 0's (issue 21).
    assert grid is not None and (grid.tile_size, grid.target_mpp) == (256, 0.499)
    assert grid.cols * grid.rows == len(ws.manifest.tiles(slide.id))
    filtered = ws.manifest.step(slide.id, Workspace.FILTER)
    assert filtered is not None and filtered.done and filtered.params == {
        "min_laplacian": 100.0, "min_saturated": 0.1, "max_white": 0.6}
    (summary,) = ws.manifest.slide_summaries()
    assert (summary.tiles_tissue, summary.tiles_kept, summary.last_done) == (
        len(tissue), len(kept), "filter")
    assert summary.steps == {"tile": "done", "filter": "done"} and summary.errors == {}
    (thumb,) = ws.manifest.artifacts(slide.id, "thumbnail")
    assert ws.root / thumb.path == ws.thumbnail_path(slide.key)
    assert ws.thumbnail_path(slide.key).is_file() and ws.tissue_mask_path(slide.key).is_file()


def _sources() -> list[Path]:
    return sorted((ROOT / "stainctl").rglob("*.py"))


def test_sql_runs_only_in_the_workspace_package():
    """The manifest is reached through named `Manifest` methods; `grep -rn "execute(" stainctl`
    hits `workspace/` only, and no record outside it is a raw sqlite3.Row."""
    workspace = ROOT / "stainctl" / "workspace"
    offenders = []
    for path in _sources():
        if path.is_relative_to(workspace):
            continue
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\bexecute(many|script)?\(|sqlite3\.(Row|connect)|\.db\.", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
    assert any("execute(" in p.read_text() for p in workspace.glob("*.py"))  # the rule can fail
