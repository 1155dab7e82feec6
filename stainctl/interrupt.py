"""Stopping at a safe point on Ctrl-C (SIGINT) or SIGTERM (what cron, systemd and Slurm send).

One handler for both signals, installed by the CLI around each command (`handling_signals`).
Outside a `deferred` section it raises `Interrupted` wherever Python is, as Ctrl-C always did:
manifest transactions roll back and atomic writes leave nothing under a final name, so every
point is a safe one. Inside a `deferred` section (a C library calling back into Python, where an
exception would be swallowed by the callback) it only records the signal: the callback polls
`pending()` and makes the library stop, and the section raises when it ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None
_deferred = 0


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; the exit status is 128 + its number (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    first = _pending is None
    _pending = signum
    # A second signal while the first one unwinds only gets recorded, so the clean-up (the run's
    # outcome, temp files) finishes.
    if first and not _deferred:
        raise Interrupted(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the block (main thread only)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _pending = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending = None


def pending() -> int | None:
    """The signal received, if any (a callback inside a `deferred` section polls this)."""
    return _pending


def check() -> None:
    """Raise `Interrupted` if a signal came in."""
    if _pending is not None:
        raise Interrupted(_pending)


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block a signal is only recorded; it is raised when the block ends."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
    check()


def run_watched(fn: Callable[[], T]) -> T:
    """Run `fn` on a worker thread while the main thread waits in Python, so a signal is handled
    at once even when `fn` spends minutes inside a C library (whose callbacks poll `pending()`);
    return its result or raise its error."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:
            box["error"] = err

    global _pending
    thread = threading.Thread(target=work, name="stainctl-watched", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except BaseException:
        # Interrupted without `handling_signals` (Python's own Ctrl-C): make the worker's
        # callbacks stop it too, and wait, so nothing writes on after the caller cleaned up.
        before, _pending = _pending, _pending or signal.SIGINT
        thread.join()
        _pending = before
        raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
