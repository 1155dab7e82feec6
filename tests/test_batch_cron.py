"""An overnight batch as a lab's cron job runs it: what goes wrong around the slides (a wrong
scheduler address, evaluate on the main job's output folder, a full disk) is one clear line."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port


@contextmanager
def _listener(reply: bytes | None) -> Iterator[str]:
    """A TCP server that is not a Dask scheduler: silent (None, like a web server waiting for a
    request) or answering `reply` at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()


@pytest.mark.parametrize("reply", [None, b"HTTP/1.0 400 Bad Request\r\n\r\n"])
def test_a_port_that_is_not_a_dask_scheduler_is_one_message(reply: bytes | None) -> None:
    """Before: the Dask client waited without end on a silent port (a cron job hung all night),
    or died with a traceback on another protocol's bytes read as a message length."""
    from stainctl.cluster.connect import probe
    from stainctl.errors import UsageError

    with _listener(reply) as address, pytest.raises(UsageError) as err:
        probe(address, timeout=1.0, answer=1.0)
    assert address in str(err.value) and "not answer as a Dask scheduler" in str(err.value)
    if reply is None:  # silence may be a busy scheduler as well as the wrong port
        assert "within 1 s" in str(err.value) and "overloaded" in str(err.value)


def test_a_tls_scheduler_is_not_expected_to_greet_first() -> None:
    """Over TLS the client speaks first: an address without a scheme on a cluster whose Dask
    configuration says tls got "does not answer as a Dask scheduler" from a silent listener."""
    import dask.config

    from stainctl.cluster.connect import probe

    with _listener(None) as address:
        host_port = address.split("://", 1)[1]
        with dask.config.set({"distributed.comm.default-scheme": "tls"}):
            probe(host_port, timeout=1.0, answer=1.0)  # listening is all it can check
        probe(address.replace("tcp://", "tls://"), timeout=1.0, answer=1.0)


def test_a_real_scheduler_passes_the_probe() -> None:
    from distributed import LocalCluster

    from stainctl.cluster.connect import probe

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                      protocol="tcp://") as cluster:
        # In-process clusters speak inproc:// by default, which the probe leaves alone.
        assert cluster.scheduler_address.startswith("tcp://")
        probe(cluster.scheduler_address, timeout=5.0)


def test_a_scheduler_that_answered_is_not_probed_again(monkeypatch) -> None:
    """The main job's steps each probe before their work: once is enough per process."""
    from distributed import LocalCluster

    from stainctl.cluster import connect

    monkeypatch.setattr(connect, "_ANSWERED", set())  # what earlier tests' probes kept
    calls: list[object] = []
    real = socket.create_connection
    monkeypatch.setattr(connect.socket, "create_connection",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                      protocol="tcp://") as cluster:
        for _ in range(3):
            connect.probe(cluster.scheduler_address, timeout=5.0)
    assert len(calls) == 1


def test_quiet_names_a_fluorescence_slide_left_out_as_the_table_does(cli, tmp_path,
                                                                     dapi_path) -> None:
    """-q printed `failed: dapi: ...so this one was left out` where the summary table says
    `left out`: the morning reader was told to fix a slide that needs nothing."""
    r = cli("translate", dapi_path, "--marker", "demo-ki67", "-o", tmp_path / "out",
            "-q")
    assert r.exit_code == 1, r.output  # the exit status still counts it
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"left out: {dapi_path.stem}: {dapi_path}"), lines[0]


def test_status_counts_a_left_out_slide_as_the_run_did(cli, tmp_path, dapi_path) -> None:
    """`status --json` counted the fluorescence slide the main job left out under "failed",
    where the run's summary said "0 failed, 1 left out"; its kind now stays in the manifest."""
    assert cli("translate", dapi_path, "--marker", "demo-ki67", "-o", tmp_path / "out",
               "-q").exit_code == 1
    r = cli("status", "-w", tmp_path / "out" / "workspace", "--json")
    assert r.exit_code == 1, r.output  # as the run's exit status
    data = json.loads(r.stdout)
    assert (data["failed"], data["left_out"]) == (0, 1)
    [slide] = data["slides"]
    assert slide["left_out"] and slide["codes"] == {"tile": "left-out"}
    table = cli("status", "-w", tmp_path / "out" / "workspace")
    assert "\tleft out: tile: " in table.stdout, table.stdout
    # A slide that failed for a reason to fix still counts as failed: `tile` alone refuses the
    # same slide as a failure (--allow-dark is its fix).
    assert cli("tile", dapi_path, "-w", tmp_path / "ws", "-q").exit_code == 1
    data = json.loads(cli("status", "-w", tmp_path / "ws", "--json").stdout)
    assert (data["failed"], data["left_out"]) == (1, 0)
    assert data["slides"][0]["codes"] == {"tile": "dark"}


def _full_disk_under(final: Path) -> None:
    """/dev/full under the temporary this process writes `final` through (a live writer's
    temporary is kept, so the write reaches it)."""
    from stainctl.workspace.atomic import temp_path

    temp_path(final).symlink_to("/dev/full")


def test_a_full_disk_under_a_tiled_slides_thumbnail_is_named(cli, tmp_path, cmu1_path) -> None:
    """`tile` wrote its thumbnail with cv2.imwrite: on a full disk libpng printed 'Write
    Error' and the slide's line guessed "disk full or not writable?". /dev/full stands in for
    the disk under the thumbnail's temporary (this process's pid: a live writer's is kept)."""

    from stainctl.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws", create=True)
    final = ws.thumbnail_path(cmu1_path.stem)
    ws.close()
    final.parent.mkdir(parents=True)
    _full_disk_under(final)
    r = cli("tile", cmu1_path, "-w", tmp_path / "ws")
    assert r.exit_code == 1, r.output
    assert f"disk full while writing {final}; free space and run again" in r.stderr, r.stderr
    assert "libpng" not in r.stderr


def test_a_full_disk_under_the_side_by_side_png_is_named(tmp_path, cmu1_path, capfd) -> None:
    """The main job on a full output disk: before, the side-by-side PNG's failure was `could
    not write PATH` with libpng's `Write Error` lines on stderr and no cause; now the error is
    ENOSPC naming the PNG, as every other disk-full message. /dev/full stands in for the disk:
    the temporary the PNG is written through is a link to it."""
    import errno

    from stainctl.steps.side_by_side import side_by_side, side_by_side_path

    thumbnail = tmp_path / "cmu.demo-ki67.png"
    final = side_by_side_path(thumbnail)
    _full_disk_under(final)
    with pytest.raises(OSError) as err:
        side_by_side(str(cmu1_path), 0.499, cmu1_path, thumbnail, "demo-ki67")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(final)
    assert "libpng" not in capfd.readouterr().err
    assert not final.exists() and list(tmp_path.iterdir()) == []  # no temporary left


def test_filter_force_with_an_unreachable_scheduler_keeps_the_metrics(cli, tmp_path,
                                                                       cmu1_path) -> None:
    """Before: `filter --force --scheduler BAD` cleared every slide's metrics, then failed on
    the scheduler (exit 2, a 'usage error'): the workspace was left unfiltered."""
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws, "-q").exit_code == 0
    assert cli("filter", "-w", ws, "-q").exit_code == 0
    address = f"tcp://127.0.0.1:{free_port()}"
    r = cli("filter", "-w", ws, "--force", "--scheduler", address)
    assert r.exit_code == 2 and address in r.stderr, r.output
    r = cli("status", "-w", ws, "--json")
    slide = json.loads(r.stdout)["slides"][0]
    assert slide["tiles_measured"] == slide["tiles_tissue"] > 0, slide
    assert slide["steps"]["filter"] == "done", slide


@pytest.mark.slow
def test_tile_min_tissue_005_lays_the_main_jobs_tiles(cli, tmp_path, cmu1_path) -> None:
    """What `tile --help` tells a script chaining the steps: `--min-tissue 0.05` gives the tiles
    the main job translates (the default 0.25 gave 14 of the sample's 18, and the virtual slide
    lost the edges of its tissue)."""
    assert cli("translate", cmu1_path, "--marker", "demo-ki67", "-o", tmp_path / "out",
               "-q").exit_code == 0
    assert cli("tile", cmu1_path, "-w", tmp_path / "ws", "--min-tissue", "0.05",
               "-q").exit_code == 0
    assert cli("tile", cmu1_path, "-w", tmp_path / "ws25", "-q").exit_code == 0

    def tissue(ws) -> int:
        return int(json.loads(cli("status", "-w", ws, "--json").stdout)
                   ["slides"][0]["tiles_tissue"])

    main = tissue(tmp_path / "out" / "workspace")
    assert tissue(tmp_path / "ws") == main > tissue(tmp_path / "ws25")


def test_a_full_disk_under_the_manifest_names_it(cli, tmp_path, cmu1_path, monkeypatch) -> None:
    """SQLite's 'database or disk is full' names no file: the cron log said `disk full
    (database or disk is full)` without saying which disk. Now the batch names its manifest."""
    import sqlite3

    from stainctl.steps import filter as filter_step

    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws, "-q").exit_code == 0

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(filter_step, "filter_slides", full)
    r = cli("filter", "-w", ws)
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == (f"error: disk full writing {ws / 'manifest.sqlite'} (database or "
                                "disk is full); free space and run the same command again: "
                                "finished work is kept and skipped"), r.stderr


def test_the_thumbnail_of_a_small_slide_is_not_enlarged(tmp_path, he_ome_path) -> None:
    """save_thumbnail's docstring says 'at most 1024 px a side'; libvips' thumbnail enlarges by
    default, so a 500 x 500 px virtual slide got a 1024 x 1024 'thumbnail' (2.7 MB, eight times
    the slide's file)."""
    import numpy as np
    import tifffile
    from PIL import Image

    from stainctl.stitch.pyramid import save_thumbnail

    small = tmp_path / "small.tif"
    tifffile.imwrite(small, tifffile.imread(he_ome_path)[:200, :300], photometric="rgb",
                     metadata=None)
    save_thumbnail(small, tmp_path / "small.png")
    with Image.open(tmp_path / "small.png") as png:
        assert png.size == (300, 200)
        assert np.array_equal(np.asarray(png.convert("RGB")), tifffile.imread(small))
