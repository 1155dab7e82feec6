"""`tile`, `filter` and `status` on real slides, through the CLI."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import cv2
import numpy as np
import openslide
import pytest

from stainctl.quality.metrics import tile_metrics


def _db(ws):
    db = sqlite3.connect(ws / "manifest.sqlite")
    db.row_factory = sqlite3.Row
    return db


def test_cmu1_grid_and_tissue_fractions_match_an_independent_computation(cli, tmp_path, cmu1_path):
    ws = tmp_path / "ws"
    r = cli("tile", cmu1_path, "-w", ws, "--json")
    assert r.exit_code == 0, r.output
    db = _db(ws)
    tiles = db.execute("SELECT * FROM tiles ORDER BY row, col").fetchall()

    # Independent: grid from the slide's own numbers; tissue from the saved mask resampled to
    # the target resolution, then averaged over each 512-px tile (outside the slide = glass).
    ref = openslide.OpenSlide(str(cmu1_path))
    w0, h0 = ref.dimensions
    mpp0 = float(ref.properties["openslide.mpp-x"])
    # 0.5 µm/px is within 1 % of the slide's 0.499: the grid is laid on level 0's own pixels
    # (stainctl.slide.grid.SNAP_TOLERANCE), so tiles are 512 level-0 px.
    assert abs(0.5 / mpp0 - 1) <= 0.01
    scale = 1.0
    cols = math.ceil(w0 / scale / 512 - 1e-9)
    rows = math.ceil(h0 / scale / 512 - 1e-9)
    assert len(tiles) == cols * rows
    mask = cv2.imread(str(ws / "slides" / "CMU-1-Small-Region" / "tissue_mask.png"), 0) > 0
    tw, th = round(w0 / scale), round(h0 / scale)
    big = np.zeros((rows * 512, cols * 512), np.float32)
    big[:th, :tw] = cv2.resize(mask.astype(np.float32), (tw, th),
                               interpolation=cv2.INTER_NEAREST)
    for t in tiles:
        assert (t["x"], t["y"]) == (round(t["col"] * 512 * scale), round(t["row"] * 512 * scale))
        expect = big[t["row"] * 512:(t["row"] + 1) * 512,
                     t["col"] * 512:(t["col"] + 1) * 512].mean()
        assert t["tissue"] == pytest.approx(expect, abs=0.03), (t["col"], t["row"])
        assert t["in_tissue"] == (t["tissue"] >= 0.25)
    kept = sum(t["in_tissue"] for t in tiles)
    assert 8 <= kept <= 20  # the strip of skin on CMU-1-Small-Region
    out = json.loads(r.stdout)
    assert out["slides"][0]["details"] == {"tiles_total": len(tiles), "tiles_tissue": kept}


def test_tile_is_idempotent_and_regrid_invalidates_downstream(cli, tmp_path, cmu1_path):
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    db = _db(ws)
    ids = [r[0] for r in db.execute("SELECT id FROM tiles")]
    r = cli("tile", cmu1_path, "-w", ws, "--json")
    assert json.loads(r.stdout)["slides"][0]["state"] == "skipped"
    assert [r[0] for r in db.execute("SELECT id FROM tiles")] == ids  # untouched, no duplicates
    steps = {r[0] for r in db.execute("SELECT step FROM steps")}
    assert steps == {"tile", "filter"}

    r = cli("tile", cmu1_path, "-w", ws, "--tile-size", "256", "--json")
    assert json.loads(r.stdout)["slides"][0]["state"] == "done"
    assert db.execute("SELECT COUNT(*) FROM tiles").fetchone()[0] > len(ids)
    assert db.execute("SELECT tile_size FROM grids").fetchone()[0] == 256
    # The old filter results described tiles that no longer exist.
    assert {r[0] for r in db.execute("SELECT step FROM steps")} == {"tile"}
    assert db.execute("SELECT COUNT(*) FROM tiles WHERE laplacian_var IS NOT NULL"
                      ).fetchone()[0] == 0


def test_bad_slides_fail_cleanly_while_good_ones_finish(cli, tmp_path, cmu1_path, dapi_path,
                                                        ihc_png_path):
    truncated = tmp_path / "truncated.svs"
    data = cmu1_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # loses the IFDs at the end of the file
    # Tile data lost but the directory intact (an interrupted copy): fails when pixels are read.
    import tifffile

    with tifffile.TiffFile(cmu1_path) as tf:
        page = tf.pages[0]
        start = page.dataoffsets[40]
        end = page.dataoffsets[-1] + page.databytecounts[-1]
    holes = tmp_path / "holes.svs"
    holes.write_bytes(data[:start] + bytes(end - start) + data[end:])
    ws = tmp_path / "ws"
    r = cli("tile", truncated, holes, cmu1_path, dapi_path, ihc_png_path,
            tmp_path / "missing.svs", "-w", ws, "--json")
    assert r.exit_code == 1
    out = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    assert out["CMU-1-Small-Region"]["state"] == "done"
    assert out["truncated"]["state"] == "failed"
    assert "corrupt" in out["truncated"]["message"]
    assert "could not read pixels" in out["holes"]["message"]
    assert "--allow-dark" in out["test3-DAPI-2-387"]["message"]
    assert "--mpp" in out["skimage_ihc_FHL2-DAB_colon"]["message"]
    assert "no such file" in out["missing"]["message"]
    assert "Traceback" not in r.output

    outcome = _db(ws).execute("SELECT command, outcome FROM runs").fetchall()
    assert [tuple(o) for o in outcome] == [("tile", "partial")]
    status = json.loads(cli("status", "-w", ws, "--json").stdout)
    by = {s["slide"]: s for s in status["slides"]}
    assert status["failed"] == 5
    assert by["CMU-1-Small-Region"]["last_done"] == "tile"
    assert "corrupt" in by["truncated"]["errors"]["tile"]

    # One clean line: the cause, none of tifffile's own log lines or its consequences.
    assert "truncated or corrupt: it ends at byte" in out["truncated"]["message"]
    assert "index 0 out of range" not in out["truncated"]["message"]
    assert "tifffile" not in r.stderr.lower() and "TiffPages" not in r.stderr

    # The fluorescence slide goes through when allowed; the filter skips failed slides.
    assert cli("tile", dapi_path, "-w", ws, "--allow-dark").exit_code == 0
    r = cli("filter", "-w", ws, "--json")
    assert r.exit_code == 0
    assert {s["slide"] for s in json.loads(r.stdout)["slides"]} == {
        "CMU-1-Small-Region", "test3-DAPI-2-387"}


def test_inputs_from_csv_glob_and_directory(cli, tmp_path, he_ome_path, ihc_png_path, cmu1_path):
    folder = tmp_path / "slides"
    (folder / "case1").mkdir(parents=True)
    shutil.copy(he_ome_path, folder / "case1" / he_ome_path.name)
    shutil.copy(ihc_png_path, folder / "ihc.png")
    (folder / "readme.txt").write_text("not a slide")
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,mpp\nslides/ihc.png,0.5\n{cmu1_path},\n")
    r = cli("tile", csv, "-w", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.output
    mpps = {s["slide"]: s["mpp"] for s in
            json.loads(cli("status", "-w", tmp_path / "a", "--json").stdout)["slides"]}
    assert mpps == {"ihc": 0.5, "CMU-1-Small-Region": pytest.approx(0.499)}

    r = cli("tile", folder, "-w", tmp_path / "b", "--mpp", "0.5", "--json")
    names = {s["slide"] for s in json.loads(r.stdout)["slides"]}
    assert names == {"OS-1-detail_HE", "ihc"}
    r = cli("tile", str(folder / "**" / "*.tif"), "-w", tmp_path / "c", "--json")
    assert [s["slide"] for s in json.loads(r.stdout)["slides"]] == ["OS-1-detail_HE"]


def test_filter_metrics_match_direct_computation_and_rejudge_without_rereading(cli, tmp_path,
                                                                               cmu1_path):
    ws = tmp_path / "ws"
    cli("tile", cmu1_path, "-w", ws)
    assert cli("filter", "-w", ws).exit_code == 0
    db = _db(ws)
    rows = db.execute("SELECT * FROM tiles WHERE in_tissue=1").fetchall()
    ref = openslide.OpenSlide(str(cmu1_path))
    scale = 1.0  # the grid is on level 0's pixels (0.5 is within 1 % of 0.499), see above
    n = math.ceil(512 * scale - 1e-6)
    expected = {"blurry": 0, "faint": 0, "background": 0}
    for t in rows:
        rgba = np.asarray(ref.read_region((t["x"], t["y"]), 0, (n, n))).astype(np.float64)
        rgb = rgba[..., :3] + (255 - rgba[..., 3:])  # outside the slide reads as white
        tile = cv2.resize(rgb.astype(np.uint8), (512, 512), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY)
        lap = cv2.Laplacian(grey, cv2.CV_64F).var()
        sat = (cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[..., 1] > 30).mean()
        white = (tile.astype(np.float64).mean(axis=2) > 235).mean()
        assert t["laplacian_var"] == pytest.approx(lap, rel=1e-4)
        assert t["saturated_frac"] == pytest.approx(sat, abs=1e-9)
        assert t["white_frac"] == pytest.approx(white, abs=1e-9)
        assert t["keep"] == int(lap >= 100 and sat >= 0.10 and white <= 0.60)
        expected["blurry"] += lap < 100
        expected["faint"] += sat < 0.10
        expected["background"] += white > 0.60
    assert 0 < sum(t["keep"] for t in rows) < len(rows)  # some background-heavy tiles go
    again = json.loads(cli("filter", "-w", ws, "--json").stdout)["slides"][0]
    assert again["state"] == "skipped"
    assert again["details"]["rejected_for"] == expected
    assert f"{len(rows) - sum(t['keep'] for t in rows)} rejected" in again["message"]

    before = [tuple(r) for r in db.execute("SELECT laplacian_var FROM tiles ORDER BY id")]
    r = cli("filter", "-w", ws, "--max-white", "1.0", "--min-saturated", "0", "--min-laplacian",
            "0", "--json")
    assert json.loads(r.stdout)["slides"][0]["details"]["tiles_measured_now"] == 0
    assert [tuple(r) for r in db.execute("SELECT laplacian_var FROM tiles ORDER BY id")] == before
    assert db.execute("SELECT SUM(keep) FROM tiles").fetchone()[0] == len(rows)


def test_metrics_of_blank_and_textured_tiles():
    blank = np.full((64, 64, 3), 250, np.uint8)
    assert tile_metrics(blank) == (0.0, 0.0, 1.0)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    lap, sat, white = tile_metrics(noisy)
    assert lap > 1000 and sat > 0.5 and white < 0.1


@pytest.mark.slow
def test_filter_killed_mid_run_resumes_where_it_stopped(cli, tmp_path, cmu1_path):
    ws = tmp_path / "ws"
    # Small tiles at high resolution: ~10k tissue tiles, a run of a few seconds.
    r = cli("tile", cmu1_path, "-w", ws, "--tile-size", "32", "--target-mpp", "0.25")
    assert r.exit_code == 0
    db = _db(ws)
    tissue = db.execute("SELECT COUNT(*) FROM tiles WHERE in_tissue=1").fetchone()[0]
    assert tissue > 5000
    proc = subprocess.Popen([sys.executable, "-m", "stainctl", "filter", "-w", str(ws), "-q",
                             "--batch-size", "20"])
    measured = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        measured = db.execute("SELECT COUNT(laplacian_var) FROM tiles").fetchone()[0]
        if measured > 0:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = db.execute("SELECT COUNT(laplacian_var) FROM tiles").fetchone()[0]
    assert 0 < at_kill < tissue, "the kill should land mid-run"
    assert db.execute("SELECT state FROM steps WHERE step='filter'").fetchone()[0] == "running"

    r = cli("filter", "-w", ws, "--json", "--batch-size", "20")
    assert r.exit_code == 0
    details = json.loads(r.stdout)["slides"][0]["details"]
    assert details["tiles_measured_now"] == tissue - at_kill  # only what was missing
    assert details["tiles_measured"] == tissue
    missing = db.execute("SELECT COUNT(*) FROM tiles WHERE in_tissue=1 AND "
                         "(laplacian_var IS NULL OR keep IS NULL)").fetchone()[0]
    assert missing == 0
    dupes = db.execute("SELECT COUNT(*) - COUNT(DISTINCT slide_id || ':' || col || ':' || row) "
                       "FROM tiles").fetchone()[0]
    assert dupes == 0


def test_filter_on_a_dask_distributed_cluster(tmp_path, cmu1_path):
    from distributed import LocalCluster

    from stainctl.quality.metrics import FilterThresholds
    from stainctl.slide.inputs import SlideRequest
    from stainctl.steps.filter import FilterOptions, filter_slides
    from stainctl.steps.tile import TileOptions, tile_slides
    from stainctl.workspace import Workspace

    ws = Workspace.open(tmp_path, create=True)
    tile_slides(ws, [SlideRequest(cmu1_path)], TileOptions())
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None, protocol="tcp") as cluster:
        result = filter_slides(ws, FilterOptions(thresholds=FilterThresholds(),
                                                 scheduler=cluster.scheduler_address,
                                                 batch_size=3))
    assert result.exit_code == 0
    local = Workspace.open(tmp_path / "local", create=True)
    tile_slides(local, [SlideRequest(cmu1_path)], TileOptions())
    filter_slides(local, FilterOptions())
    q = "SELECT laplacian_var, saturated_frac, white_frac, keep FROM tiles ORDER BY id"
    assert ws.manifest.db.execute(q).fetchall() == local.manifest.db.execute(q).fetchall()


def test_filter_before_tile_is_a_usage_error(cli, tmp_path):
    cli("tile", tmp_path / "missing.svs", "-w", tmp_path)
    r = cli("filter", "-w", tmp_path)
    assert r.exit_code == 2
    assert "run `stainctl tile" in r.output


def test_status_reports_per_slide_counts(cli, tmp_path, cmu1_path, he_ome_path):
    ws = tmp_path / "ws"
    cli("tile", cmu1_path, he_ome_path, "-w", ws)
    cli("filter", "-w", ws)
    r = cli("status", "-w", ws, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    db = _db(ws)
    for s in data["slides"]:
        sid = db.execute("SELECT id FROM slides WHERE key=?", (s["slide"],)).fetchone()[0]
        total, tissue, kept = db.execute(
            "SELECT COUNT(*), SUM(in_tissue), SUM(keep) FROM tiles WHERE slide_id=?",
            (sid,)).fetchone()
        assert (s["tiles_total"], s["tiles_tissue"], s["tiles_kept"]) == (total, tissue, kept)
        assert s["last_done"] == "filter" and s["errors"] == {}
    text = cli("status", "-w", ws).stdout
    assert "CMU-1-Small-Region" in text and "OS-1-detail_HE" in text


def test_full_disk_gives_one_clear_message(cli, tmp_path, monkeypatch, cmu1_path):
    import stainctl.workspace.manifest as manifest

    ws = tmp_path / "ws"
    cli("tile", cmu1_path, "-w", ws)

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(manifest.Manifest, "store_metrics", full)
    r = cli("filter", "-w", ws)
    assert r.exit_code == 1
    assert "disk full" in r.stderr and "run the same command again" in r.stderr
    assert "Traceback" not in r.output
    monkeypatch.undo()
    assert cli("filter", "-w", ws).exit_code == 0  # resumes once there is space


@pytest.mark.slow
def test_the_hint_after_a_failure_follows_its_reason(cli, tmp_path, cmu1_path, ihc_png_path):
    ws = tmp_path / "ws"
    r = cli("tile", ihc_png_path, cmu1_path, "-w", ws)
    assert r.exit_code == 1
    assert "add --mpp" in r.stderr and "`mpp` column" in r.stderr
    assert "run the same command again" not in r.stderr  # it would fail the same way
    assert json.loads(cli("tile", ihc_png_path, "-w", ws, "--json").stdout)["slides"][0]["code"] \
        == "no-mpp"
    # Other reasons keep "fix it and run again", beside the mpp hint.
    mixed = cli("tile", ihc_png_path, tmp_path / "missing.svs", "-w", ws)
    assert "1 slide(s) have no pixel size" in mixed.stderr
    assert "1 slide(s) failed" in mixed.stderr and "run the same command again" in mixed.stderr
    assert cli("tile", ihc_png_path, "--mpp", "0.5", "-w", ws).exit_code == 0  # the hint's fix


@pytest.mark.slow
def test_a_coloured_background_is_warned_about_and_normal_slides_are_not(
        cli, tmp_path, data_dir, cmu1_path, he_ome_path, ki67_ome_paths, ihc_png_path,
        dapi_path):
    from PIL import Image

    from stainctl.slide.reader import open_slide

    # CMU-1's pixels converted to YCbCr and saved as RGB: what a DICOM file whose header says
    # RGB but whose frames are YCbCr gives a reader.
    slide = open_slide(cmu1_path)
    rgb = slide.read_region(0, 0, 0, *slide.dimensions)
    ycbcr = tmp_path / "CMU-1-ycbcr.png"
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("YCbCr"))).save(ycbcr)
    ws = tmp_path / "ws"
    r = cli("tile", ycbcr, "--mpp", "0.499", "-w", ws, "--json")
    assert r.exit_code == 0
    [out] = json.loads(r.stdout)["slides"]
    assert "YCbCr" in out["details"]["warning"] and "YCbCr" in out["message"]
    assert "WARNING" in r.stderr and "CMU-1-ycbcr.png" in r.stderr

    normal = [cmu1_path, he_ome_path, *ki67_ome_paths, ihc_png_path, dapi_path,
              *sorted(data_dir.glob("paired/*/*.jpg"))]
    r = cli("tile", *normal, "--mpp", "0.5", "--allow-dark", "-w", tmp_path / "ws2", "--json")
    assert r.exit_code == 0, r.output
    slides = json.loads(r.stdout)["slides"]
    assert len(slides) == len(normal)
    assert not [s["slide"] for s in slides if "warning" in s["details"]]
    assert "WARNING" not in r.stderr


def test_tiles_enlarged_from_a_coarse_slide_are_warned_about(cli, tmp_path, cmu1_path):
    # A 5 µm/px image tiled at 0.5 µm/px went through the main job without a word and came out
    # blurred and unstained. Up to 2x is the ordinary case (a 20x scan for a 40x model).
    ws = tmp_path / "ws"
    r = cli("tile", cmu1_path, "--mpp", "2", "-w", ws, "--json")
    assert r.exit_code == 0, r.output
    [out] = json.loads(r.stdout)["slides"]
    assert "has 2 µm/px" in out["details"]["warning"] and "enlarged 4.0x" in out["message"]
    assert "--mpp" in out["details"]["warning"]
    [row] = json.loads(cli("status", "-w", ws, "--json").stdout)["slides"]
    assert "enlarged 4.0x" in row["warning"]  # kept for every later step and `status`
    r = cli("tile", cmu1_path, "--mpp", "1.0", "-w", tmp_path / "ws2", "--json")
    [out] = json.loads(r.stdout)["slides"]
    assert "warning" not in out["details"], out


def test_rejection_reasons_say_when_a_tile_failed_several_tests():
    from stainctl.steps.filter import _reasons

    one_each = {"measured": 18, "kept": 8, "background": 9, "blurry": 0, "faint": 1}
    assert _reasons(one_each) == "; 10 rejected: 9 mostly glass, 1 weakly stained"
    overlapping = {**one_each, "background": 10}
    assert _reasons(overlapping) == ("; 10 rejected: 10 mostly glass, 1 weakly stained; a tile "
                                     "can fail several")
    assert _reasons({**one_each, "kept": 18}) == ""
