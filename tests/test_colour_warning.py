"""The coloured-background (YCbCr) warning is kept with the slide in the manifest: the main job's
outcome, summary and JSON carry it on every run, a rerun that skips tiling included, and each
run logs it once."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from models_helpers import install_fast

from stainctl.workspace import SCHEMA_VERSION, Workspace
from stainctl.workspace.schema import SCHEMA_V1


@pytest.fixture
def ycbcr_path(tmp_path, cmu1_path):
    """CMU-1's pixels converted to YCbCr and saved as RGB (as in test_tile_filter): what a DICOM
    file whose header says RGB but whose frames are YCbCr gives a reader."""
    from PIL import Image

    from stainctl.slide.reader import open_slide

    slide = open_slide(cmu1_path)
    rgb = slide.read_region(0, 0, 0, *slide.dimensions)
    slide.close()
    path = tmp_path / "CMU-1-ycbcr.png"
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("YCbCr"))).save(path)
    return path


def _warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if " WARNING " in ln]


@pytest.mark.slow
def test_the_main_job_carries_the_warning_on_every_run(cli, tmp_path, use_models, ycbcr_path):
    use_models(install_fast)
    out = tmp_path / "out"
    args = ("translate", ycbcr_path, "--mpp", "0.499", "--marker", "test-ki67", "-o", out)
    for state in ("done", "skipped"):  # the second run skips every step, tiling included
        r = cli(*args, "--json")
        assert r.exit_code == 0, r.output
        [slide] = json.loads(r.stdout)["slides"]
        assert slide["state"] == state
        assert "YCbCr" in slide["details"]["warning"] and "warning: " in slide["message"]
        [line] = _warnings(r.stderr)  # logged once, naming the file
        assert "YCbCr" in line and str(ycbcr_path) in line
    r = cli(*args)  # the summary a person reads
    summary = " ".join(r.stdout.split())
    assert "skipped" in summary and "warning: the background is coloured" in summary
    assert len(_warnings(r.stderr)) == 1

    ws = Workspace.open(out / "workspace", readonly=True)
    [record] = ws.manifest.slides()
    assert record.warning is not None and "YCbCr" in record.warning
    ws.close()
    # status shows it too, in its table and its JSON.
    r = cli("status", "-w", out / "workspace")
    assert "warning: the background is coloured" in " ".join(r.stdout.split())
    [row] = json.loads(cli("status", "-w", out / "workspace", "--json").stdout)["slides"]
    assert "YCbCr" in row["warning"]


def test_a_slide_without_warning_has_none(cli, tmp_path, cmu1_path):
    r = cli("tile", cmu1_path, "-w", tmp_path / "ws", "--json")
    [slide] = json.loads(r.stdout)["slides"]
    assert "warning" not in slide["details"] and "warning" not in slide["message"]
    assert not _warnings(r.stderr)
    ws = Workspace.open(tmp_path / "ws", readonly=True)
    assert [s.warning for s in ws.manifest.slides()] == [None]
    ws.close()
    [row] = json.loads(cli("status", "-w", tmp_path / "ws", "--json").stdout)["slides"]
    assert row["warning"] is None


def test_a_version_1_manifest_gains_the_warning_column(tmp_path):
    db = sqlite3.connect(tmp_path / "manifest.sqlite")
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO slides (key, path, fingerprint, added) VALUES ('a', '/a', '', 'x')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    ws = Workspace.open(tmp_path)
    assert ws.manifest.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    [slide] = ws.manifest.slides()
    assert slide.warning is None
    ws.manifest.set_slide_warning(slide.id, "odd")
    assert ws.manifest.slides()[0].warning == "odd"
    ws.close()
