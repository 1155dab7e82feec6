"""One writer per workspace.

An advisory `flock` on `WS/.lock` does the locking, so a writer killed with SIGKILL releases it
at once (no stale-lock clean-up). The file's content (pid, host, start time, command) only serves
the message shown to a second writer.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from stainctl.errors import WorkspaceLocked


class WriterLock:
    def __init__(self, path: Path, command: str) -> None:
        self.path = path
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkspaceLocked(
                f"workspace {self.path.parent} is being written by another stainctl run "
                f"({_describe(holder)}); wait for it to finish, or stop it and run again"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: Path) -> dict[str, object] | None:
    """Who holds the lock at `path` now (pid, host, since, command), or None when nobody does.

    Takes no lock (a reader must never make a writer fail to start): the holder writes its pid
    into the file and empties it on release, so a file naming a live process of this host is
    held. For another host's pid a shared lock is tried and dropped. Works read-only.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = _read_holder(fd)
        if not info:
            return None
        if info.get("host") == socket.gethostname():
            pid = info.get("pid")
            return info if isinstance(pid, int) and pid_alive(pid) else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return info
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    if not holder:
        return "holder unknown"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}, "
        f"`{holder.get('command')}`"
    )
