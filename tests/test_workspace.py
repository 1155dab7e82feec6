"""Manifest schema, writer lock and atomic outputs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from stainctl.errors import UsageError, WorkspaceLocked
from stainctl.workspace import SCHEMA_VERSION, Workspace, WriterLock, atomic_path


def test_new_workspace_is_wal_and_versioned(tmp_path):
    ws = Workspace.open(tmp_path / "ws", create=True)
    db = ws.manifest.db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"slides", "tiles", "grids", "steps", "runs", "artifacts"} <= tables


def test_missing_workspace_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a stainctl workspace"):
        Workspace.open(tmp_path / "nothing")


def test_newer_schema_is_refused(tmp_path):
    Workspace.open(tmp_path, create=True).close()
    db = sqlite3.connect(tmp_path / "manifest.sqlite")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UsageError, match="newer stainctl"):
        Workspace.open(tmp_path)


def test_second_writer_in_another_process_is_refused(tmp_path):
    ws = Workspace.open(tmp_path, create=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from stainctl.workspace import WriterLock
        with WriterLock(Path({str(tmp_path / '.lock')!r}), "tile slides"):
            print("locked", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked = pytest.raises(WorkspaceLocked, match=rf"pid {holder.pid} .*`tile slides`")
        with locked, ws.writing("filter", {}):
            pass
    finally:
        holder.communicate("\n", timeout=10)
    with ws.writing("filter", {}):  # free again once the holder exits
        pass
    runs = ws.manifest.db.execute("SELECT command, outcome FROM runs").fetchall()
    assert [tuple(r) for r in runs] == [("filter", "ok")]


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from stainctl.workspace import WriterLock
        WriterLock(Path({str(tmp_path / '.lock')!r}), "x").acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with WriterLock(tmp_path / ".lock", "y"):
        pass


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out" / "thumb.png"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == final.parent
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"


def test_lock_message_names_the_holder(tmp_path):
    with WriterLock(tmp_path / ".lock", "tile a.svs"), pytest.raises(WorkspaceLocked) as info:
        WriterLock(tmp_path / ".lock", "filter").acquire()
    assert "tile a.svs" in str(info.value) and str(tmp_path) in str(info.value)
