"""What a first-time user trips over (the fifth new-user run): each test failed before its fix."""

from __future__ import annotations

import json
import re

import pytest
from models_helpers import install_fast


@pytest.fixture
def models(use_models):
    return use_models(install_fast)


def _to_do(stderr: str, step: str) -> list[int]:
    return [int(n) for n in re.findall(rf"INFO {step}: (\d+) to do", stderr)]


@pytest.mark.slow
def test_a_resumed_translate_counts_only_the_tiles_left(cli, tmp_path, models, cmu1_path):
    # Ctrl-C in a translate, then the same command: the progress said "18 to do" and ended at
    # "10/18" when 8 tiles were in the store already.
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    first = cli("translate", "-w", ws, "--marker", "test-ki67")
    total = _to_do(first.stderr, "translate")
    assert total and total[0] > 3, first.stderr
    chunks = sorted((ws / "slides" / "CMU-1-Small-Region" / "translated" /
                     "test-ki67.zarr" / "c").glob("*/*/0/0/0"))
    for c in chunks[:3]:  # as if the run had been stopped before writing them
        c.unlink()
    from stainctl.workspace import Workspace

    w = Workspace.open(ws)
    sid = w.manifest.slides()[0].id
    row = w.manifest.step(sid, "translate:test-ki67")
    assert row is not None
    w.manifest.set_step(sid, "translate:test-ki67", "running", params_hash=row.params_hash,
                        params=row.params)
    w.close()
    again = cli("translate", "-w", ws, "--marker", "test-ki67")
    assert again.exit_code == 0, again.output
    assert _to_do(again.stderr, "translate") == [3], again.stderr
    # Its counter lines count up to the 3, never past them.
    counts = re.findall(r"INFO translate: (\d+)/(\d+) ", again.stderr)
    assert all(int(total) == 3 for _, total in counts), again.stderr


def test_an_output_folder_that_cannot_be_written_stops_before_any_work(cli, tmp_path, models,
                                                                      cmu1_path, he_ome_path):
    # -o under a file (as a read-only share, which root cannot be shown in a test): stitch
    # failed each slide with "unexpected error (NotADirectoryError ...); run again with -v"
    # (exit 1), readout logged "failed: unexpected error" without a slide, the main job with
    # -w elsewhere translated everything first, evaluate computed every metric first.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    bad = a_file / "out"
    ws = tmp_path / "ws"
    r = cli("translate", cmu1_path, "--marker", "test-ki67", "-o", bad, "-w", ws)
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: -o {bad}: {a_file} is a file, not a folder; give a "
                                "folder path"), r.stderr
    assert not ws.exists()  # nothing was started
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
    for args in (("stitch", "-w", ws, "-o", bad), ("stitch", "-w", ws, "-o", bad / "x.tif"),
                 ("readout", he_ome_path, "--marker", "ki67", "-o", bad),
                 ("normalize", he_ome_path, "--target", cmu1_path, "-o", bad, "-w", ws),
                 ("evaluate", "--real", he_ome_path, "--fake", he_ome_path, "--metrics",
                  "stain", "--report", bad)):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: -"), (args, r.stderr)
        assert f"{a_file} is a file, not a folder" in r.stderr, (args, r.stderr)
        assert "unexpected" not in r.stderr and "measuring" not in r.stderr, r.stderr


def test_a_read_only_output_folder_is_named_with_its_cause(tmp_path, monkeypatch):
    import os

    from stainctl.cli.outdir import check_output_folder
    from stainctl.errors import UsageError

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a non-root user
    with pytest.raises(UsageError, match=rf"^-o {tmp_path}/a/b: cannot write in {tmp_path} "
                       r"\((Permission denied|Read-only file system)\); choose a writable"):
        check_output_folder(tmp_path / "a" / "b", "-o")
    assert not (tmp_path / "a").exists()


def test_every_failed_slide_names_its_file(cli, tmp_path, ihc_png_path, dapi_path):
    # The summary names a slide by its key ("ihc: the slide has no pixel size"): the reasons
    # of a missing pixel size and of a dark background named no file, unlike the others.
    r = cli("tile", ihc_png_path, dapi_path, "-w", tmp_path / "ws", "--json")
    assert r.exit_code == 1
    slides = {s["path"]: s for s in json.loads(r.stdout)["slides"]}
    for path, code in ((ihc_png_path, "no-mpp"), (dapi_path, "dark")):
        s = slides[str(path)]
        assert s["state"] == "failed" and s["code"] == code, s
        assert s["message"].startswith(f"{path}: "), s
        assert s["message"].count(str(path)) == 1, s
    r = cli("readout", ihc_png_path, "--marker", "ki67", "-o", tmp_path / "readout", "--json")
    [s] = json.loads(r.stdout)["slides"]
    assert s["message"].startswith(f"{ihc_png_path}: the slide has no pixel size"), s


def test_translate_on_a_workspace_refuses_the_main_job_options(cli, tmp_path, cmu1_path):
    # `translate -w WS -o DIR --readout` translated the tiles and wrote nothing to DIR, silently.
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    r = cli("translate", "-w", ws, "--marker", "demo-ki67", "-o", tmp_path / "out", "--readout")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: -o, --readout: only for the main job (with SLIDES)")
    assert "stainctl stitch -w WS -o DIR" in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("translate", "-w", ws, "--marker", "demo-ki67", "--format", "tiff", "--mpp", "0.5")
    assert r.exit_code == 2 and r.stderr.startswith("error: --format, --mpp: only for"), r.stderr


def test_models_list_keeps_its_columns_in_line(cli, use_models):
    # Fixed widths (8 for the marker, 7 for the engine): 'normaliser', 'histdist' and
    # 'transformers' pushed the rest of their rows out of line.
    use_models()  # an empty models directory: the shipped cards only
    lines = cli("models", "list").stdout.splitlines()[1:]
    assert lines[0].split() == ["name", "makes", "engine", "weights"]
    starts = {ln.index(ln.split()[3], len(ln.split()[0]) + len(ln.split()[1]) + 2)
              for ln in lines}
    assert len(starts) == 1, lines
    assert any(ln.split()[:3] == ["stainfuser", "normaliser", "stainfuser"] for ln in lines)


def test_status_says_what_its_exit_code_means(cli, tmp_path, cmu1_path, ihc_png_path):
    # `status` exits 1 when a slide has failed (a script's test), which its help did not say.
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, ihc_png_path, "-w", ws).exit_code == 1
    assert cli("status", "-w", ws).exit_code == 1
    assert "Exit 1 when a slide of the workspace has an error" in " ".join(
        cli("status", "--help").stdout.split())


def test_evaluate_says_when_the_sets_are_at_different_resolutions(cli, ki67_ome_paths):
    # Slides are sampled at their own µm/px by default: the two scans of one Ki67 glass
    # (0.2271 and 0.3461 µm/px) were compared without a word about it.
    ndpi, vsi = ki67_ome_paths
    args = ("evaluate", "--real", ndpi, "--fake", vsi, "--metrics", "stain", "--tile-size",
            "512", "--json")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    [caveat] = [c for c in json.loads(r.stdout)["caveats"] if "different resolutions" in c]
    assert "0.2271" in caveat and "0.3461" in caveat and "--tile-mpp" in caveat
    assert "different resolutions" in r.stderr  # at once, before the metrics
    r = cli(*args, "--tile-mpp", "0.5")
    assert not [c for c in json.loads(r.stdout)["caveats"] if "different resolutions" in c]


def test_a_readout_failure_is_logged_under_its_own_slide(cli, tmp_path, ki67_ome_paths,
                                                          ihc_png_path):
    # The PNG (no pixel size) fails before its tiles are counted: its line was
    # "readout OS-2-vsi_Ki67: failed: .../skimage_ihc_FHL2-DAB_colon.png: ...".
    r = cli("readout", ki67_ome_paths[1], ihc_png_path, "--marker", "ki67", "-o",
            tmp_path / "ro", "--tile-size", "256")
    assert r.exit_code == 1
    [line] = [ln for ln in r.stderr.splitlines() if "WARNING" in ln and "failed" in ln]
    assert f"WARNING readout {ihc_png_path.stem}: failed: {ihc_png_path}: " in line, line


def test_a_slide_list_row_written_relative_to_the_current_folder_says_so(
        cli, tmp_path, monkeypatch, ihc_png_path):
    # Rows are read relative to the CSV's folder (README); one written relative to where the
    # user stands failed as ".../lists/slides/ihc.png: no such file or directory".
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "ihc.png").symlink_to(ihc_png_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "batch.csv").write_text("path,mpp\nslides/ihc.png,0.5\n")
    r = cli("tile", "lists/batch.csv", "-w", "ws", "--json")
    assert r.exit_code == 1
    [s] = json.loads(r.stdout)["slides"]
    assert (f"lists/batch.csv, line 2: slides/ihc.png is read relative to the list's folder "
            f"({tmp_path}/lists), where it does not exist; write it relative to that folder "
            f"or as {tmp_path}/slides/ihc.png") in s["message"], s["message"]


def test_the_main_job_on_a_missing_gpu_stops_before_tiling(cli, tmp_path, models, monkeypatch,
                                                           cmu1_path):
    # `--device cuda` without a GPU: the slides were tiled and filtered, then the usage error
    # came, and OUT/workspace stayed behind.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "test-ki67", "-o", out, "--device", "cuda")
    assert r.exit_code == 2
    assert "torch sees no CUDA GPU here" in r.stderr and "--device cpu" in r.stderr
    assert "tile:" not in r.stderr, r.stderr
    assert not (out / "workspace").exists()


def test_quiet_still_names_the_slides_that_failed(cli, tmp_path, cmu1_path, ihc_png_path):
    # -q "prints only warnings and errors", yet a batch with a failed slide printed nothing at
    # all and exited 1 (a cron job's mail said nothing).
    r = cli("tile", cmu1_path, ihc_png_path, "-w", tmp_path / "ws", "-q")
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.strip() == (f"failed: skimage_ihc_FHL2-DAB_colon: {ihc_png_path}: the slide "
                                "has no pixel size (mpp) in its metadata; give it in an `mpp` "
                                "column of a CSV slide list (`path,mpp` rows), or with --mpp if "
                                "every slide of the command has that size (--mpp overrides "
                                "them all)"), r.stderr


def test_a_random_bytes_svs_gets_the_unsupported_hint(cli, tmp_path):
    import os

    noise = tmp_path / "noise.svs"
    noise.write_bytes(os.urandom(4096).replace(b"II", b"ii").replace(b"MM", b"mm"))
    r = cli("tile", noise, "-w", tmp_path / "ws")
    assert r.exit_code == 1
    assert "1 slide(s) are in a format stainctl does not read" in r.stderr
    assert "fix the cause shown above" not in r.stderr
    [slide] = json.loads(cli("tile", noise, "-w", tmp_path / "ws", "--json").stdout)["slides"]
    assert slide["code"] == "unsupported"


def test_a_tiff_that_cannot_be_read_gets_the_corrupt_hint(cli, tmp_path, cmu1_path):
    # A TIFF header whose first directory is inside the file but holds garbage: not truncated,
    # still unreadable.
    data = bytearray(cmu1_path.read_bytes()[:4096])
    data[4:8] = (16).to_bytes(4, "little") if data[:2] == b"II" else (16).to_bytes(4, "big")
    data[16:4096] = b"\xff" * (4096 - 16)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(data))
    r = cli("tile", bad, "-w", tmp_path / "ws")
    assert r.exit_code == 1
    assert "1 slide(s) are truncated or corrupt" in r.stderr
    assert "fix the cause shown above" not in r.stderr


def test_a_readout_where_every_slide_failed_does_not_point_at_an_empty_csv(cli, tmp_path,
                                                                          ihc_png_path):
    out = tmp_path / "readout"
    r = cli("readout", ihc_png_path, "--marker", "ki67", "-o", out)
    assert r.exit_code == 1  # as before: a failed slide
    assert "(heat maps and GeoJSON beside it)" not in r.stdout
    assert "no slide was read out" in r.stdout
    assert str(out / "readout.csv") in r.stdout  # still named: it holds the header only


def test_the_json_hint_is_a_full_sentence(cli, tmp_path, ihc_png_path, dapi_path):
    # It was the summary's fragment written to follow "N slide(s) ": "have no pixel size ...".
    from stainctl.errors import HINTS, hint, slide_hint

    for code in HINTS:  # one table says each kind's step of many slides and of one
        assert hint(code).endswith(HINTS[code].step) and slide_hint(code).endswith(hint(code)[
            len(HINTS[code].many):]), code
        sentence = slide_hint(code)
        assert sentence[0].isupper() and sentence.endswith("."), (code, sentence)
        assert "slide(s)" not in sentence, (code, sentence)
    r = cli("tile", ihc_png_path, dapi_path, "-w", tmp_path / "ws", "--json")
    hints = {s["code"]: s["hint"] for s in json.loads(r.stdout)["slides"]}
    assert hints["no-mpp"].startswith("The slide has no pixel size"), hints
    assert hints["dark"].startswith("The slide looks like a fluorescence"), hints
    assert "--allow-dark" in hints["dark"]


def test_evaluate_of_a_one_slide_readout_with_itself(cli, tmp_path):
    # It printed nan for everything, bias B-A included, and "warning: n=0" for the empty text
    # column.
    import csv

    from stainctl.readout.outputs import COLUMNS

    readout = tmp_path / "readout.csv"
    with open(readout, "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        w.writerow({c: "" for c in COLUMNS} | {
            "slide": "OS-2-vsi_Ki67", "path": "/x/OS-2.vsi_Ki67.ome.tif", "marker": "ki67",
            "mpp_um": 0.5, "tiles": 40, "tissue_mm2": 2.5, "dab_positive_area_pct": 12.5,
            "h_score": 30.1, "nuclei": 812})
    r = cli("evaluate", "--readout", readout, "--readout", readout)
    assert r.exit_code == 0, r.output
    assert "nan" not in r.stdout, r.stdout
    assert "warning:" not in r.stdout, r.stdout
    [line] = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("h_score:")]
    assert "bias (B-A)=0 " in line and "mean |B-A|=0" in line, line
    assert "at least 3 slides" in line, line
    data = json.loads(cli("evaluate", "--readout", readout, "--readout", readout,
                          "--json").stdout)
    assert "warning" not in data["values"] and "warning" not in data["classes"]
    h = data["values"]["h_score"]
    assert h["n"] == 1 and h["bland_altman_bias"] == 0 and h["mean_abs_difference"] == 0
    assert h["pearson_r"] is None and "at least 3 slides" in h["missing"]


@pytest.mark.parametrize("second", ["0.25", "abc", ""])
def test_a_slide_list_naming_one_slide_twice_with_different_mpp_fails(cli, tmp_path, cmu1_path,
                                                                       second):
    # The second row disappeared silently: the first one won.
    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{cmu1_path},0.5\n{cmu1_path},{second}\n")
    r = cli("tile", listing, "-w", tmp_path / "ws")
    assert r.exit_code == 2, r.output
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert str(listing) in line and str(cmu1_path) in line, line
    assert "'0.5' (line 2)" in line and f"{second!r} (line 3)" in line, line
    assert not (tmp_path / "ws").exists()


def test_a_slide_list_naming_one_slide_twice_alike_is_read_once(tmp_path, cmu1_path, caplog):
    from stainctl.slide.inputs import expand_slides

    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{cmu1_path},0.5\n{cmu1_path},0.50\n")
    with caplog.at_level("INFO", logger="stainctl.slide.inputs"):
        [req] = expand_slides([str(listing)])
    assert req.mpp == 0.5 and req.error is None
    # Said, so 2 rows giving 1 slide is not a mystery.
    assert [r.getMessage() for r in caplog.records] == [
        f"{listing}, line 3: {cmu1_path} repeats line 2; counted once"]


def test_one_slide_given_twice_with_different_pixel_sizes_across_arguments_fails(tmp_path,
                                                                                 cmu1_path):
    # Within one list the rows were checked; a list plus the slide itself (or two lists) kept
    # the first silently.
    from stainctl.errors import UsageError
    from stainctl.slide.inputs import expand_slides

    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{cmu1_path},0.25\n")
    with pytest.raises(UsageError, match=r"given twice .*0\.25 µm/px and its metadata's"):
        expand_slides([str(listing), str(cmu1_path)])
    other = tmp_path / "other.csv"
    other.write_text(f"path,mpp\n{cmu1_path},0.5\n")
    with pytest.raises(UsageError, match="given twice"):
        expand_slides([str(listing), str(other)])
    [req] = expand_slides([str(listing), str(listing)])  # the same list twice agrees with itself
    assert req.mpp == 0.25


def test_a_bad_mpp_row_repeated_across_arguments_is_one_slide_or_a_clear_refusal(tmp_path,
                                                                                cmu1_path):
    """The same bad row in two lists was refused as "given twice with different pixel sizes
    (its metadata's and its metadata's)": the rows' errors, naming their own list, differed."""
    from stainctl.errors import UsageError
    from stainctl.slide.inputs import expand_slides

    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    for listing in (one, two):
        listing.write_text(f"path,mpp\n{cmu1_path},abc\n")
    [req] = expand_slides([str(one), str(two)])
    assert req.error is not None and str(one) in req.error  # fails alone, as the first row
    with pytest.raises(UsageError, match="an mpp that is not a number and its metadata's"):
        expand_slides([str(one), str(cmu1_path)])


def test_a_slide_given_twice_across_arguments_is_counted_once_with_a_line(tmp_path, cmu1_path,
                                                                          caplog):
    from stainctl.slide.inputs import expand_slides

    listing = tmp_path / "slides.csv"
    listing.write_text(f"path\n{cmu1_path}\n")
    with caplog.at_level("INFO", logger="stainctl.slide.inputs"):
        [req] = expand_slides([str(listing), str(cmu1_path)])
    assert req.path == cmu1_path
    assert [r.getMessage() for r in caplog.records] == [
        f"{cmu1_path} is given twice ({cmu1_path}); counted once"]
