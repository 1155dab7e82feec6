"""Fault injection: signals, damaged or read-only workspaces, giant slides, shared output folders,
odd slide lists (issue 16). Signals and mounts are exercised in subprocesses; read-only cases use
a read-only bind mount (`unshare -rm`), as CI runs as root and chmod would not stop it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import ROOT
from test_golden import MAIN_JOB_LEVEL0_SHA256, SAMPLE

from stainctl.workspace import Workspace

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _stainctl(*args: object, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stainctl", *map(str, args)],
                          capture_output=True, text=True, env=env or ENV, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- read-only mounts ----------------------------------------------------------------------

def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                                f"mount --bind {tmp} {tmp} && mount -o remount,bind,ro {tmp}"],
                               capture_output=True)
    return probe.returncode == 0


CAN_MOUNT = _can_mount()


def _read_only(folders: list[Path], *args: object) -> subprocess.CompletedProcess[str]:
    """Run stainctl with `folders` bind-mounted read-only (in a private mount namespace)."""
    mounts = " && ".join(f"mount --bind {shlex.quote(str(f))} {shlex.quote(str(f))} && "
                         f"mount -o remount,bind,ro {shlex.quote(str(f))}" for f in folders)
    argv = shlex.join([sys.executable, "-m", "stainctl", *map(str, args)])
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{mounts} && exec {argv}"],
                          capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, cmu1_path) -> Path:
    """A workspace with the sample slide tiled and filtered (copy it before changing it)."""
    ws = tmp_path_factory.mktemp("tiled") / "ws"
    assert _stainctl("tile", cmu1_path, "-w", ws, "-q").returncode == 0
    assert _stainctl("filter", "-w", ws, "-q").returncode == 0
    return ws


def _copy(ws: Path, to: Path) -> Path:
    shutil.copytree(ws, to)
    return to


# --- 1. a damaged manifest -----------------------------------------------------------------

def test_a_manifest_of_random_bytes_is_one_line_in_every_command(tmp_path, cmu1_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "manifest.sqlite").write_bytes(np.random.default_rng(0).bytes(16384))
    for args in (("status", "-w", ws), ("tile", cmu1_path, "-w", ws), ("filter", "-w", ws),
                 ("stitch", "-w", ws)):
        r = _stainctl(*args)
        assert r.returncode == 2, (args, r.stderr)
        line = _one_error_line(r)
        assert str(ws / "manifest.sqlite") in line and "not a database" in line
        assert "new workspace" in line and "outputs already on disk are kept" in line


def test_a_manifest_with_damaged_pages_is_one_line(tiled, tmp_path):
    ws = _copy(tiled, tmp_path / "ws")
    manifest = ws / "manifest.sqlite"
    data = bytearray(manifest.read_bytes())
    page = 4096
    rng = np.random.default_rng(1)
    for start in range(page, len(data), page):  # every page but the header page
        data[start:start + page] = rng.bytes(min(page, len(data) - start))
    manifest.write_bytes(bytes(data))
    r = _stainctl("status", "-w", ws)
    assert r.returncode == 2
    line = _one_error_line(r)
    assert str(manifest) in line and "damaged" in line and "restore it" in line


# --- 2, 3. read-only workspaces and output folders -----------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not CAN_MOUNT, reason="needs unshare -rm (user and mount namespaces)")
def test_a_read_only_workspace_can_be_read(cli, tiled, tmp_path, cmu1_path):
    from test_stitch import _translate_identity

    from stainctl.slide.reader import open_slide

    ws = _copy(tiled, tmp_path / "ws")
    slide = open_slide(cmu1_path)
    _translate_identity(ws, "he", slide.read_region(0, 0, 0, *slide.dimensions))
    r = _read_only([ws], "status", "-w", ws, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["slides"][0]["last_done"] == "filter"
    # evaluate reads a workspace's kept tiles (--real) and its translated tiles (--fake).
    r = _read_only([ws], "evaluate", "--real", ws, "--fake", ws, "--marker", "he",
                   "--metrics", "stain", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    data = json.loads(r.stdout)
    assert data["real"]["images"] > 0 and data["fakes"][0]["images"] > 0
    # A writer is refused with one line naming the workspace, and nothing is lost.
    r = _read_only([ws], "filter", "-w", ws, "--force")
    assert r.returncode == 2
    line = _one_error_line(r)
    assert str(ws) in line and "is read-only" in line


def test_readers_open_the_manifest_read_only(tiled, tmp_path):
    """What the mount test checks, without a mount: a reader's connection cannot write."""
    ws = _copy(tiled, tmp_path / "ws")
    reader = Workspace.open(ws, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.manifest.db.execute("CREATE TABLE x (a)")
    reader.close()


def test_a_workspace_of_an_older_schema_is_read_read_only(tiled, tmp_path):
    """An archived workspace made by an earlier stainctl (schema 1, before slides.warning) cannot
    be migrated when it is read-only; readers take it as it is."""
    ws = _copy(tiled, tmp_path / "ws")
    db = sqlite3.connect(ws / "manifest.sqlite")
    db.execute("ALTER TABLE slides DROP COLUMN warning")
    db.execute("ALTER TABLE steps DROP COLUMN code")  # schema 4's, as schema 1 had neither
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    reader = Workspace.open(ws, readonly=True)
    slides = reader.manifest.slides()
    assert slides and slides[0].warning is None and slides[0].mpp
    [summary] = reader.manifest.slide_summaries()  # steps without their schema-4 `code`
    assert summary.steps and not summary.codes and not summary.left_out
    reader.close()
    writer = Workspace.open(ws)  # a writer upgrades it
    assert writer.manifest.db.execute("PRAGMA user_version").fetchone()[0] >= 2
    writer.close()


@pytest.mark.skipif(not CAN_MOUNT, reason="needs unshare -rm (user and mount namespaces)")
def test_a_read_only_output_folder_is_one_line(tmp_path, cmu1_path):
    out = tmp_path / "shared"
    out.mkdir()
    r = _read_only([out], "translate", cmu1_path, "--marker", "demo-ki67", "-o", out / "run")
    assert r.returncode == 2
    line = _one_error_line(r)
    assert str(out / "run") in line and "Read-only file system" in line
    (out / "file").write_text("")
    r = _stainctl("tile", cmu1_path, "-w", out / "file" / "ws")
    assert r.returncode == 2
    assert "Not a directory" in _one_error_line(r)


# --- 4. a giant slide ----------------------------------------------------------------------

def giant_tiff(path: Path, side: int = 1_000_000, tile: int = 4096, mpp: float = 0.25) -> Path:
    """A tiled RGB TIFF whose header claims side x side px with no pyramid: every tile entry
    points at one deflated white tile, so the file is half a megabyte."""
    n = (-(-side // tile)) ** 2
    data = zlib.compress(b"\xff" * (tile * tile * 3), 9)
    short, long_, rational = 3, 4, 5
    ntags = 14
    bps = 8 + 2 + 12 * ntags + 4  # values that do not fit in an entry follow the IFD
    xres, yres, offsets_at = bps + 6, bps + 14, bps + 22
    counts_at = offsets_at + 4 * n
    data_at = counts_at + 4 * n
    tags = [(256, long_, 1, side), (257, long_, 1, side), (258, short, 3, bps),
            (259, short, 1, 8), (262, short, 1, 2), (277, short, 1, 3),
            (282, rational, 1, xres), (283, rational, 1, yres), (284, short, 1, 1),
            (296, short, 1, 3), (322, short, 1, tile), (323, short, 1, tile),
            (324, long_, n, offsets_at), (325, long_, n, counts_at)]
    assert len(tags) == ntags
    ifd = struct.pack("<H", ntags)
    for tag, typ, count, value in tags:
        if typ == short and count == 1:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<3H", 8, 8, 8))
        fh.write(struct.pack("<2I", round(10_000 / mpp), 1) * 2)  # pixels per cm
        fh.write(struct.pack(f"<{n}I", *([data_at] * n)))
        fh.write(struct.pack(f"<{n}I", *([len(data)] * n)))
        fh.write(data)
    return path


def test_a_giant_slide_without_a_pyramid_does_not_hold_the_batch(tmp_path, cmu1_path):
    from stainctl.slide.reader import open_slide

    giant = giant_tiff(tmp_path / "giant.tif")
    assert giant.stat().st_size < 5_000_000
    assert open_slide(giant).dimensions == (1_000_000, 1_000_000)
    start = time.monotonic()
    r = _stainctl("tile", giant, cmu1_path, "-w", tmp_path / "ws", "--json")
    assert time.monotonic() - start < 60
    assert r.returncode == 1
    slides = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    assert slides["CMU-1-Small-Region"]["state"] == "done"
    assert slides["giant"]["state"] == "failed"
    assert "--max-thumbnail-read" in slides["giant"]["message"]
    assert "1,000,000 x 1,000,000" in slides["giant"]["message"]


def test_a_long_thumbnail_read_reports_progress(cmu1_path):
    from stainctl.slide.reader import open_slide
    from stainctl.slide.thumbnail import STRIP_PIXELS, read_thumbnail

    heard: list[tuple[str, float]] = []
    slide = open_slide(cmu1_path)
    import stainctl.slide.thumbnail as thumbnail

    # Small strips, so the sample takes several (a giant slide takes thousands).
    thumbnail.STRIP_PIXELS = 500_000
    try:
        read_thumbnail(slide, 4.0, report=lambda what, f: heard.append((what, f)))
    finally:
        thumbnail.STRIP_PIXELS = STRIP_PIXELS
    assert len(heard) > 3 and heard[-1][1] == 1.0
    assert [f for _, f in heard] == sorted(f for _, f in heard)


# --- 5, 6. signals -------------------------------------------------------------------------

def _run_until(args: list[object], pattern: str, sig: int, env: dict[str, str] | None = None,
               script: str | None = None) -> tuple[int, bool, str]:
    """Start stainctl, send `sig` when a stderr line matches `pattern`; (status, sent, stderr)."""
    head = [sys.executable, "-c", script] if script else [
        sys.executable, "-m", "stainctl"]
    p = subprocess.Popen([*head, *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env or ENV)
    assert p.stderr is not None
    sent, seen = False, []
    for line in p.stderr:
        seen.append(line)
        if re.search(pattern, line):
            p.send_signal(sig)
            sent = True
            break
    seen.append(p.stderr.read())
    return p.wait(timeout=300), sent, "".join(seen)


def _level0_sha256(path: Path) -> str:
    with tifffile.TiffFile(path) as tif:
        level0 = tif.series[0].levels[0].asarray()
    return hashlib.sha256(np.ascontiguousarray(level0).tobytes()).hexdigest()


@pytest.mark.slow
def test_main_job_killed_and_terminated_resumes_to_the_same_pixels(tmp_path):
    """SIGKILL and SIGTERM at several points of the README main job; each rerun resumes, and
    the last one gives the golden pixels, a sound manifest and every run's outcome."""
    out = tmp_path / "out"
    env = {**ENV, "STAINCTL_MODELS": str(tmp_path / "models")}
    job = ["translate", SAMPLE, "--marker", "demo-ki67", "-o", out]
    final = out / "CMU-1-Small-Region.demo-ki67.ome.tiff"
    # Stitch logs nothing before its work (a rerun's log says no "to do" it will not do): its
    # points follow translate's line for the slide.
    stitch = r"translate: CMU-1-Small-Region: (done|skipped)"
    # Translate's start line comes with its first written batch: mid-slide (its 10 % lines are
    # at least 2 s apart, and this slide takes about that long).
    points = [(r"filter: \d+ to do", signal.SIGKILL), (r"translate: \d+ to do", signal.SIGTERM),
              (stitch, signal.SIGKILL), (stitch, signal.SIGTERM)]
    for pattern, sig in points:
        code, sent, stderr = _run_until(job, pattern, sig, env)
        assert sent, stderr
        if sig == signal.SIGTERM:
            assert code == 143, stderr
            assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
            assert "Traceback" not in stderr
        else:
            assert code == -signal.SIGKILL
        if pattern == stitch and code != 0:
            assert not final.exists()
        status = _stainctl("status", "-w", out / "workspace", env=env)
        assert "running" not in status.stdout  # nothing holds the lock now
    r = _stainctl(*job, env=env)
    assert r.returncode == 0, r.stderr
    assert _level0_sha256(final) == MAIN_JOB_LEVEL0_SHA256

    db = sqlite3.connect(out / "workspace" / "manifest.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    outcomes = [r[0] for r in db.execute("SELECT outcome FROM runs ORDER BY id")]
    assert outcomes == ["interrupted"] * len(points) + ["ok"]
    states = {r[0] for r in db.execute("SELECT state FROM steps")}
    assert states == {"done"}
    leftovers = [p for p in [*out.rglob(".*tmp-*")] if "zarr" not in p.parts[-2:]]
    assert leftovers == []


# The canvas is blended in a child process; the stitch process receives its blocks here.
STITCH_SLOWLY = textwrap.dedent("""
    import sys, time
    import stainctl.stitch.canvas_process as canvas_process
    blocks = canvas_process.CanvasProcess.blocks
    def slow(self):
        for i, block in enumerate(blocks(self)):
            if i == 1:
                print("writing the pyramid", file=sys.stderr, flush=True)
            time.sleep(0.3)
            yield block
    canvas_process.CanvasProcess.blocks = slow
    from stainctl.cli.app import main
    sys.argv[0] = "stainctl"
    main()
""")


# Both pyramid writers: stainctl's own, and libvips (reading the canvas through a callback).
@pytest.mark.parametrize(("sig", "extra"), [(signal.SIGINT, []), (signal.SIGTERM, []),
                                            (signal.SIGTERM, ["--level0"])])
def test_a_signal_while_stitch_writes_the_pyramid_stops_it(cli, tmp_path, sig, extra,
                                                            cmu1_path):
    from test_stitch import _tiled_workspace, _translate_identity, canvas_processes

    from stainctl.slide.reader import open_slide

    ws = tmp_path / "ws"
    _tiled_workspace(cli, ws)
    slide = open_slide(cmu1_path)
    _translate_identity(ws, "he", slide.read_region(0, 0, 0, *slide.dimensions))
    out = tmp_path / "out"
    code, sent, stderr = _run_until(["stitch", "-w", ws, "-o", out, *extra],
                                    "writing the pyramid", sig,
                                    script=STITCH_SLOWLY)
    assert sent
    assert code == 128 + sig, stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr
    assert list(out.iterdir()) == []  # no file under the final name, no temporary
    w = Workspace.open(ws, readonly=True)
    run = w.manifest.db.execute("SELECT command, outcome FROM runs ORDER BY id DESC").fetchone()
    assert tuple(run) == ("stitch", "interrupted")
    w.close()
    assert not canvas_processes(tmp_path), "the canvas process outlived the stitch"



def test_status_tells_a_running_step_from_an_interrupted_one(tiled, tmp_path):
    ws = _copy(tiled, tmp_path / "ws")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from stainctl.workspace import Workspace
        ws = Workspace.open({str(ws)!r})
        with ws.writing("filter", {{}}):
            sid = ws.manifest.slides()[0].id
            ws.manifest.set_step(sid, "filter", "running", run_id=ws.run_id)
            print("running", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "running"
        r = _stainctl("status", "-w", ws, "--json")
        assert json.loads(r.stdout)["slides"][0]["steps"]["filter"] == "running"
        assert "(filter running)" in _stainctl("status", "-w", ws).stdout
    finally:
        holder.kill()  # as SIGKILL leaves it: the run has no outcome, the step is 'running'
        holder.wait()
    r = _stainctl("status", "-w", ws, "--json")
    assert json.loads(r.stdout)["slides"][0]["steps"]["filter"] == "interrupted"
    w = Workspace.open(ws)
    assert w.manifest.db.execute("SELECT outcome FROM runs").fetchall()[-1][0] is None
    with w.writing("status-test", {}):  # the next run that takes the lock closes it
        pass
    outcomes = [r[0] for r in w.manifest.db.execute("SELECT outcome FROM runs ORDER BY id")]
    assert outcomes[-2:] == ["interrupted", "ok"]
    w.close()


# --- 7, 8. temporaries of killed writers, and of live ones ---------------------------------

def test_a_rerun_removes_the_temporaries_of_a_killed_tile(tiled, tmp_path, cmu1_path):
    ws = _copy(tiled, tmp_path / "ws")
    folder = ws / "slides" / "CMU-1-Small-Region"
    pid = _dead_pid()
    stale = [folder / f".thumbnail.tmp-{pid}.png", folder / f".tissue_mask.tmp-{pid}.png"]
    for p in stale:
        p.write_bytes(b"half a png")
    w = Workspace.open(ws)  # what the kill left: the step still 'running'
    sid = w.manifest.slides()[0].id
    row = w.manifest.step(sid, "tile")
    assert row is not None
    w.manifest.set_step(sid, "tile", "running", params_hash=row.params_hash, params=row.params)
    w.close()
    assert _stainctl("tile", cmu1_path, "-w", ws, "-q").returncode == 0
    assert not any(p.exists() for p in stale)
    assert (folder / "thumbnail.png").exists()


def test_the_lock_holder_removes_older_temporaries_whatever_their_pid(tiled, tmp_path, cmu1_path):
    """A pid can be reused (or belong to another pid namespace): inside the workspace, a
    temporary older than the lock is a dead run's all the same."""
    ws = _copy(tiled, tmp_path / "ws")
    folder = ws / "slides" / "CMU-1-Small-Region"
    reused = folder / f".thumbnail.tmp-{os.getpid()}.png"  # a live pid, not the writer's
    reused.write_bytes(b"half a png")
    os.utime(reused, (time.time() - 60, time.time() - 60))
    kept = folder / "notes.tmp-1.txt"  # not a temporary's name
    kept.write_text("mine")
    r = _stainctl("tile", cmu1_path, "-w", ws, "--json")  # everything is skipped
    assert json.loads(r.stdout)["slides"][0]["state"] == "skipped"
    assert not reused.exists() and kept.exists()


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    """Two workspaces stitching into one folder: the second must not delete the first's
    temporary while its writer lives."""
    from stainctl.workspace.atomic import atomic_path, remove_stale

    final = tmp_path / "slide.ome.tiff"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".slide.ome.tmp-{live.pid}.tiff"
        dead = tmp_path / f".slide.ome.tmp-{_dead_pid()}.tiff"
        other = tmp_path / f".other.ome.tmp-{_dead_pid()}.tiff"
        for p in (alive, dead, other):
            p.write_bytes(b"x")
        assert remove_stale(final) == [dead]
        assert alive.exists() and other.exists()
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"done")
        assert final.read_bytes() == b"done" and alive.exists()
    finally:
        live.kill()
        live.wait()
    remove_stale(final)
    assert not alive.exists()


# --- 9, 10. odd slide lists ----------------------------------------------------------------

def test_a_bad_csv_row_fails_that_slide_with_its_line(tmp_path, cmu1_path):
    csv = tmp_path / "slides.csv"
    bad = tmp_path / "other.svs"
    shutil.copyfile(cmu1_path, bad)
    csv.write_text(f"path,mpp\n{cmu1_path},\n{bad},abc\n")
    r = _stainctl("tile", csv, "-w", tmp_path / "ws", "--json")
    assert r.returncode == 1, r.stderr
    slides = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    assert slides["CMU-1-Small-Region"]["state"] == "done"
    assert slides["other"]["state"] == "failed"
    assert f"{csv}, line 3" in slides["other"]["message"]
    assert "'abc' is not a number" in slides["other"]["message"]


def test_a_batch_of_symlinks_gives_one_slide_per_link(tmp_path, cmu1_path):
    links = []
    for name in ("case01", "case02"):
        link = tmp_path / f"{name}.svs"
        link.symlink_to(cmu1_path)
        links.append(link)
    r = _stainctl("tile", *links, "-w", tmp_path / "ws", "--json")
    assert r.returncode == 0, r.stderr
    slides = json.loads(r.stdout)["slides"]
    assert [s["slide"] for s in slides] == ["case01", "case02"]
    assert [s["path"] for s in slides] == [str(p) for p in links]


# --- 11. smaller ---------------------------------------------------------------------------

def test_missing_paths_and_link_loops_are_named_in_full(tmp_path, cmu1_path):
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    broken = tmp_path / "broken.svs"
    broken.symlink_to(tmp_path / "gone.svs")
    missing = tmp_path / "sub" / "missing.svs"
    r = _stainctl("tile", loop, broken, missing, cmu1_path, "-w", tmp_path / "ws", "--json")
    assert r.returncode == 1
    msg = {s["slide"]: s["message"] for s in json.loads(r.stdout)["slides"]}
    assert str(loop) in msg["loop"] and "loop of symbolic links" in msg["loop"]
    assert str(broken) in msg["broken"] and "broken symbolic link" in msg["broken"]
    assert str(missing) in msg["missing"] and "no such file" in msg["missing"]


def test_disk_full_names_where_it_was_writing():
    import errno

    from stainctl.steps.report import unexpected

    err = OSError(errno.ENOSPC, "No space left on device")
    assert unexpected(err, "/data/ws") == ("disk full while writing /data/ws; free space and "
                                           "run again")
    assert "None" not in unexpected(err)


class Gadget:
    """A class of the author's: unpickling it could run their code."""


def test_models_add_refuses_a_pickled_checkpoint(cli, tmp_path, use_models):
    import torch

    models = use_models()
    card = tmp_path / "card.toml"
    card.write_text((ROOT / "stainctl" / "models" / "cards" / "demo-ki67.toml").read_text()
                    .replace('name = "demo-ki67"', 'name = "mine"'))
    pth = tmp_path / "generator.pth"
    torch.save({"w": torch.ones(1), "gadget": Gadget()}, pth)
    r = cli("models", "add", card, "--weights", pth)
    assert r.exit_code == 2
    assert "pickled Python objects" in r.stderr and str(pth) in r.stderr
    assert "weights_only=False" not in r.stderr and "add_safe_globals" not in r.stderr
    assert not (models / "mine").exists()


def test_a_corrupt_weight_file_is_found_before_any_slide_is_touched(cli, tmp_path, use_models,
                                                                    cmu1_path):
    from models_helpers import install_fast

    def install(directory: Path) -> None:
        card = install_fast(directory)
        weights = card.parent / "generator.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        card.write_text(card.read_text().replace(
            'path = "generator.safetensors"',
            f'path = "generator.safetensors"\nsha256 = "{digest}"'))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte: still loadable, but not the file the card names
        weights.write_bytes(bytes(data))

    use_models(install)
    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "test-ki67", "-o", out)
    assert r.exit_code == 2
    assert "sha256" in r.stderr
    assert not (out / "workspace").exists()  # nothing tiled, no empty workspace left


@pytest.mark.slow
def test_a_main_job_rerun_keeps_the_side_by_side_png(cli, tmp_path):
    out = tmp_path / "out"
    job = ("translate", SAMPLE, "--marker", "demo-ki67", "-o", out, "--json")
    first = json.loads(cli(*job).stdout)["slides"][0]["details"]["side_by_side"]
    before = os.stat(first).st_mtime_ns
    stale = Path(first).with_name(f".{Path(first).stem}.tmp-{_dead_pid()}.png")
    stale.write_bytes(b"half")
    time.sleep(0.01)
    again = json.loads(cli(*job).stdout)["slides"][0]["details"]["side_by_side"]
    assert again == first and os.stat(first).st_mtime_ns == before
    assert not stale.exists()


# --- runs started together on a new workspace ----------------------------------------------

def _hold_lock(ws: Path) -> subprocess.Popen[str]:
    """Another stainctl run that creates `ws` and holds its writer lock until told to go."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from stainctl.workspace import Workspace
        ws = Workspace.open({str(ws)!r}, create=True)
        with ws.writing("tile winner.svs", {{}}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("command", ["tile", "translate"])
def test_a_run_refused_by_the_lock_leaves_the_winners_new_workspace(cli, tmp_path, monkeypatch,
                                                                    command, cmu1_path):
    # Both runs find no workspace; the other one creates it and takes the lock between this
    # run's look and its open (made deterministic by starting it from inside `open`).
    out = tmp_path / "out"
    ws = out / "workspace"
    real_open = Workspace.open.__func__  # type: ignore[attr-defined]
    holders: list[subprocess.Popen[str]] = []

    def racing_open(cls, root, **kwargs):
        if not holders:
            holders.append(_hold_lock(ws))
        return real_open(cls, root, **kwargs)

    monkeypatch.setattr(Workspace, "open", classmethod(racing_open))
    args = (("tile", cmu1_path, "-w", ws) if command == "tile" else
            ("translate", cmu1_path, "--marker", "demo-ki67", "-o", out))
    try:
        r = cli(*args)
        assert r.exit_code == 2 and "being written by another stainctl run" in r.stderr
        assert "winner.svs" in r.stderr
        assert (ws / "manifest.sqlite").is_file() and (ws / ".lock").is_file()
    finally:
        for holder in holders:
            holder.communicate("\n", timeout=30)
    assert [h.returncode for h in holders] == [0]  # the winner finished its run
    runs = [r.outcome for r in Workspace.open(ws, readonly=True).manifest.runs()]
    assert runs == ["ok"]


def test_a_usage_error_still_removes_the_workspace_the_run_created(cli, tmp_path, cmu1_path):
    out = tmp_path / "a" / "out"
    r = cli("translate", cmu1_path, "--marker", "no-such-model", "-o", out)
    assert r.exit_code == 2
    assert not (tmp_path / "a").exists()


def test_two_runs_creating_a_workspace_at_once_both_open_it(tmp_path, monkeypatch):
    """Both read schema version 0, then both set the schema up: the second finds it done."""
    import threading

    from stainctl.workspace.manifest import Manifest

    both_read = threading.Barrier(2, timeout=30)
    real = Manifest.transaction

    def after_both_read(self):
        if self.db.execute("PRAGMA user_version").fetchone()[0] == 0:
            both_read.wait()
        return real(self)

    monkeypatch.setattr(Manifest, "transaction", after_both_read)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            Workspace.open(tmp_path / "ws", create=True).close()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    ws = Workspace.open(tmp_path / "ws", readonly=True)
    assert ws.manifest.slides() == [] and ws.manifest.runs() == []


def test_runs_started_together_on_a_new_workspace_work_or_are_refused(tmp_path, cmu1_path):
    ws = tmp_path / "new" / "ws"
    procs = [subprocess.Popen([sys.executable, "-m", "stainctl", "tile", str(cmu1_path),
                               "-w", str(ws), "-q"], stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or (code == 2 and "being written by another stainctl run" in err), err
    assert Workspace.open(ws, readonly=True).manifest.slides()[0].key == "CMU-1-Small-Region"


# --- manifest damage met while reading rows ------------------------------------------------

def _damage_table_tail(manifest: Path, table: str) -> None:
    """Overwrite the last leaf pages of `table`, keeping the header, the schema and the
    table's first pages: a query starts well and meets the damage while fetching."""
    db = sqlite3.connect(manifest)
    page = db.execute("PRAGMA page_size").fetchone()[0]
    leaves = [n for (n,) in db.execute(
        "SELECT pageno FROM dbstat WHERE name=? AND pagetype='leaf' ORDER BY path", (table,))]
    db.close()
    assert len(leaves) > 4, leaves
    data = bytearray(manifest.read_bytes())
    for n in leaves[len(leaves) // 2:]:
        data[(n - 1) * page:n * page] = b"\xff" * page
    manifest.write_bytes(bytes(data))


def test_damage_met_while_fetching_rows_is_the_one_line_message(tmp_path, cmu1_path):
    from stainctl.workspace.manifest import Manifest, ManifestDamaged

    ws = tmp_path / "ws"  # small tiles: the tiles table spans several pages
    assert _stainctl("tile", cmu1_path, "-w", ws, "--tile-size", "64", "-q").returncode == 0
    manifest = ws / "manifest.sqlite"
    _damage_table_tail(manifest, "tiles")
    m = Manifest(manifest)
    try:
        slide = m.slides()[0]
        for read in (m.tiles, m.tissue_tiles, m.unmeasured_tiles):
            with pytest.raises(ManifestDamaged, match=re.escape(str(manifest))):
                read(slide.id)
        for fetch in (lambda c: c.fetchall(), lambda c: c.fetchmany(10_000), list):
            cur = m.db.execute("SELECT * FROM tiles ORDER BY id")
            assert cur.fetchone() is not None  # the statement starts well: the damage is on
            with pytest.raises(ManifestDamaged, match="damaged"):
                fetch(cur)
    finally:
        m.close()
    r = _stainctl("filter", "-w", ws)
    assert r.returncode == 2
    line = _one_error_line(r)
    assert str(manifest) in line and "damaged" in line and "restore it" in line


def test_a_manifest_that_cannot_be_opened_is_closed(tmp_path, monkeypatch):
    from stainctl.workspace.manifest import Manifest, ManifestDamaged

    opened: list[sqlite3.Connection] = []
    real = sqlite3.connect

    def tracked(*args, **kwargs):
        db = real(*args, **kwargs)
        opened.append(db)
        return db

    monkeypatch.setattr(sqlite3, "connect", tracked)
    path = tmp_path / "manifest.sqlite"
    path.write_bytes(np.random.default_rng(0).bytes(16384))
    for readonly in (False, True):
        with pytest.raises(ManifestDamaged):
            Manifest(path, readonly=readonly)
    assert len(opened) == 2
    for db in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.execute("SELECT 1")


# --- the side-by-side PNG -------------------------------------------------------------------

@pytest.mark.slow
def test_a_side_by_side_that_cannot_be_written_fails_only_that_png(cli, tmp_path, cmu1_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b"):
        (slides / f"{name}.svs").symlink_to(cmu1_path)
    out = tmp_path / "out"
    blocked = out / "a.demo-ki67.side-by-side.png"
    blocked.mkdir(parents=True)  # a folder where the PNG goes: renaming onto it fails
    r = cli("translate", slides, "--marker", "demo-ki67", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    outcomes = {o["slide"]: o for o in json.loads(r.stdout)["slides"]}
    assert set(outcomes) == {"a", "b"} and all(o["state"] == "done" for o in outcomes.values())
    a, b = outcomes["a"], outcomes["b"]
    assert Path(a["details"]["output"]).is_file() and "side_by_side" not in a["details"]
    assert "side-by-side PNG could not be written" in a["message"]
    assert str(blocked) in a["message"]
    assert Path(b["details"]["side_by_side"]).is_file()
