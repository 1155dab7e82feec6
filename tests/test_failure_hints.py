"""The next step printed after a batch with failures follows each slide's reason (errors.HINTS),
and a failure line names the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models_helpers import install_fast


def _batch(tmp_path, cmu1_path):
    """CMU-1 (good), a truncated copy, an unsupported file, a missing one, and a white PNG with
    its pixel size in a CSV (no tissue)."""
    from PIL import Image

    truncated = tmp_path / "trunc.svs"
    data = cmu1_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    unsupported = tmp_path / "notes.xyz"
    unsupported.write_text("not a slide")
    white = tmp_path / "white.png"
    Image.fromarray(np.full((512, 512, 3), 245, np.uint8)).save(white)
    listing = tmp_path / "white.csv"
    listing.write_text(f"path,mpp\n{white},0.5\n")
    return [cmu1_path, truncated, unsupported, tmp_path / "missing.svs", listing]


@pytest.mark.slow
def test_each_failure_gets_the_next_step_of_its_own_reason(cli, tmp_path, cmu1_path, dapi_path,
                                                           ihc_png_path):
    slides = [*_batch(tmp_path, cmu1_path), dapi_path, ihc_png_path]
    r = cli("tile", *slides, "-w", tmp_path / "ws")
    assert r.exit_code == 1
    err = r.stderr
    # One hint per kind, with its count.
    assert "1 slide(s) are truncated or corrupt: copy the file again" in err
    assert "1 slide(s) are in a format stainctl does not read" in err
    assert "1 slide(s) failed: the file cannot be reached; check the path" in err
    assert "1 slide(s) have no tissue found: check the slide" in err
    assert "--min-tissue / --tissue-threshold" in err
    assert "1 slide(s) look like fluorescence or dark-field slides" in err and \
        "--allow-dark" in err
    assert "1 slide(s) have no pixel size" in err
    assert "fix the cause shown above" not in err  # every reason here has its own step
    assert err.count("slide(s) are truncated") == 1
    assert "The other 1 slide(s) are saved." in err

    # --json carries each failure's kind and hint.
    r = cli("tile", *slides, "-w", tmp_path / "ws", "--json")
    out = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    codes = {k: s.get("code") for k, s in out.items()}
    assert codes == {"CMU-1-Small-Region": None, "trunc": "corrupt", "notes": "unsupported",
                     "missing": "missing", "white": "no-tissue", "test3-DAPI-2-387": "dark",
                     "skimage_ihc_FHL2-DAB_colon": "no-mpp"}
    assert "copy the file again" in out["trunc"]["hint"]
    assert "hint" not in out["CMU-1-Small-Region"]


def test_a_truncated_file_is_named_by_its_path_in_one_line(cli, tmp_path, cmu1_path):
    truncated = tmp_path / "trunc.svs"
    data = cmu1_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    r = cli("tile", truncated, "-w", tmp_path / "ws")
    assert r.exit_code == 1
    [line] = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("failed")]
    assert f"trunc: {truncated}: the file is truncated or corrupt" in line
    [slide] = json.loads(cli("tile", truncated, "-w", tmp_path / "ws", "--json").stdout)["slides"]
    assert slide["message"].startswith(f"{truncated}: ")
    assert slide["message"].count(str(truncated)) == 1  # named once, not twice


def test_nothing_is_said_to_be_saved_when_every_slide_failed(cli, tmp_path, dapi_path,
                                                             ihc_png_path):
    r = cli("tile", dapi_path, ihc_png_path, "-w", tmp_path / "ws")
    assert r.exit_code == 1
    assert "saved" not in r.stderr


def test_the_no_mpp_hint_does_not_send_a_mixed_batch_to_mpp(cli, tmp_path, cmu1_path,
                                                            ihc_png_path):
    # --mpp would rescale CMU-1 too: the hint offers the CSV column first, and --mpp only for a
    # command whose slides all lack a pixel size or have that one.
    r = cli("tile", ihc_png_path, cmu1_path, "-w", tmp_path / "ws")
    err = " ".join(r.stderr.split())
    assert "in a CSV slide list with an `mpp` column (`path,mpp` rows)" in err
    assert "add --mpp MICRONS_PER_PIXEL only when every slide of the command lacks one or " \
           "has that size" in err
    [png] = [s for s in json.loads(cli("tile", ihc_png_path, "-w", tmp_path / "ws",
                                       "--json").stdout)["slides"]]
    assert "if every slide of the command has that size" in png["message"]
    # The fix the hint gives works: the PNG in a CSV with its mpp, CMU-1 keeping its own.
    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{ihc_png_path},0.5\n{cmu1_path},\n")
    r = cli("tile", listing, "-w", tmp_path / "ws", "--json")
    assert r.exit_code == 0, r.output


def test_tile_and_translate_explain_mpp_the_same_way():
    import typer

    from stainctl.cli.app import app

    group = typer.main.get_command(app)
    helps = set()
    for name in ("tile", "translate"):
        [opt] = [p for p in group.commands[name].params if p.name == "mpp"]  # type: ignore[attr-defined]
        helps.add(opt.help)
    [text] = helps
    assert "every slide of the command" in text and "`path,mpp`" in text


@pytest.mark.slow
def test_the_main_job_says_a_fluorescence_slide_was_left_out_not_to_run_again(
        cli, tmp_path, use_models, cmu1_path, dapi_path):
    use_models(install_fast)
    r = cli("translate", cmu1_path, dapi_path, "--marker", "test-ki67", "-o", tmp_path / "out")
    assert r.exit_code == 1
    err = " ".join(r.stderr.split())
    assert "1 slide(s) were left out as not brightfield H&E" in err and "nothing to fix" in err
    assert "run the same command again" not in err and "--allow-dark" not in err
    assert "The other 1 slide(s) are saved." in err
    # Its own line and the log say "left out", not "failed": nothing went wrong with it.
    [line] = [ln for ln in r.stdout.splitlines() if dapi_path.stem in ln]
    assert line.split()[:2] == ["left", "out"], line
    assert f"tile: {dapi_path.stem}: left out (" in r.stderr
    assert "2 slide(s): 1 done, 0 already done, 0 failed, 1 left out" in r.stdout
