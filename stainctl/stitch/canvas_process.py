"""The blended canvas made in a child process, at a lower priority, handed over in shared memory.

Why a process: the canvas needs ~3.5 s of CPU per 1.2 gigapixels. On a thread of the stitch
process it competed with the pyramid encoder (then libvips) for the cores and for the interpreter
lock, which slowed the save by more than the canvas' own CPU time. In a child at nice 10 the
canvas runs when the encoder leaves a core idle (bench/RESULTS.md, stitch).

The child (`python -m stainctl.stitch.canvas_process`) blends band rows straight into a ring of
`SLOTS` band buffers in a memfd both processes map, and sends (slot, first row, rows) for each
row block, in canvas order. The parent yields those rows as arrays in the shared ring, and tells
the child how far it has consumed, so a slot is reused only once nothing reads it any more. The
child ignores SIGINT/SIGTERM (the parent handles the stop, then kills it) and exits when the
parent's end of the pipe closes.

Linux only (memfd); elsewhere `available()` is False and the canvas stays on a thread.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from stainctl.workspace.tilestore import TileStore

# Only the standard library above: the child ignores Ctrl-C from its first statement on (it
# shares the terminal's process group; the stitch stops and then kills it), and heavy imports
# would widen the window before that. Not a session of its own: with the kernel's autogroup
# scheduling, a new session is a new group with a full share of the CPU, and nice 10 would no
# longer yield to the encoder (measured with libvips: the save ~0.7 s slower).

SLOTS = 4  # band buffers: the canvas' current and previous band, and the writer's HELD blocks
NICE = 10  # nice 5 still slowed the save by ~1 s in 3 runs; 10 and 19 did not (RESULTS.md)


def available() -> bool:
    return hasattr(os, "memfd_create") and bool(sys.executable)


class CanvasProcess:
    """The canvas of `store` made by a child process; use as a context manager, then `blocks()`.

    Memory: SLOTS bands of (side x width x 3) bytes shared by both processes (~280 MB at 40k px
    wide), plus the child's two decoded tiles and its interpreter.
    """

    def __init__(self, store: TileStore, background: tuple[int, int, int],
                 written: np.ndarray) -> None:
        """`written`: the store's tiles present (`TileStore.written()`), read once by the
        caller and handed to the child."""
        self.store = store
        self.background = background
        self.written = written
        lay = store.layout
        self.shape = (SLOTS, lay.side, lay.width, 3)
        self._child: subprocess.Popen[bytes] | None = None
        self._ring: np.ndarray | None = None
        self._map: mmap.mmap | None = None

    def __enter__(self) -> CanvasProcess:
        """Start the child. OSError (no memfd, no memory, no process): nothing is left open."""
        import numpy as np

        size = int(np.prod(self.shape))
        opened: list[int] = []
        try:
            fd = os.memfd_create("stainctl-canvas")
            opened.append(fd)
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            down_r, down_w = os.pipe()  # parent -> child: consumed block numbers
            opened += [down_r, down_w]
            up_r, up_w = os.pipe()  # child -> parent: blocks, then None or an error
            opened += [up_r, up_w]
            r, g, b = self.background
            cmd = [sys.executable, "-m", "stainctl.stitch.canvas_process", str(self.store.path),
                   f"{r},{g},{b}", str(fd), str(down_r), str(up_w)]
            self._child = subprocess.Popen(cmd, pass_fds=(fd, down_r, up_w))
        except BaseException:
            for f in opened:
                os.close(f)
            if self._map is not None:
                self._map.close()
                self._map = None
            raise
        for f in (fd, down_r, up_w):  # the child's ends, and the memfd it has mapped
            os.close(f)
        self._to_child = Connection(down_w, readable=False)
        self._from_child = Connection(up_r, writable=False)
        self._to_child.send(self.written)  # the child's first message; a few KB
        self._ring = np.frombuffer(self._map, np.uint8).reshape(self.shape)
        return self

    def blocks(self) -> Iterator[np.ndarray]:
        """The canvas' row blocks, in order, as arrays in the shared ring. A block stays valid
        while it is one of the HELD most recently taken."""
        from stainctl.stitch.stream import HELD

        assert self._ring is not None, "use CanvasProcess as a context manager"
        i = 0
        while True:
            message = self._receive()
            if message is None:
                return
            slot, row, rows = message
            if i >= HELD:
                # That block and those before are free. A child that has sent its last block
                # has exited and needs no more of these; one that died is seen by _receive.
                with contextlib.suppress(BrokenPipeError):
                    self._to_child.send(i - HELD)
            yield self._ring[slot, row:row + rows]
            i += 1

    def _receive(self) -> Any:
        try:
            message = self._from_child.recv()
        except EOFError:
            code = self._child.wait() if self._child else None
            raise RuntimeError(f"the canvas process for {self.store.path} ended early "
                               f"(exit status {code})") from None
        if isinstance(message, BaseException):
            raise message
        return message

    def __exit__(self, *exc: object) -> None:
        if self._child is not None:
            if self._child.poll() is None:
                self._child.kill()
            self._child.wait()
        self._to_child.close()
        self._from_child.close()
        self._ring = None
        if self._map is not None:
            # A caller may still hold a block: the mapping then goes when it is collected.
            with contextlib.suppress(BufferError):
                self._map.close()


class _ParentGone(Exception):
    """The stitch process stopped reading (it finished, failed or was killed)."""


class _Ring:
    """The child's side of the ring: which slot the canvas may fill next."""

    def __init__(self, ring: np.ndarray, inbox: Connection) -> None:
        self.ring = ring
        self.inbox = inbox
        self.last = [-1] * len(ring)  # the last block taken from each slot
        self.consumed = -1  # the parent no longer reads blocks up to this one
        self.current = -1  # the slot the canvas filled last: it still reads it

    def next_band(self) -> np.ndarray:
        while True:
            for s in range(len(self.ring)):
                if s != self.current and self.last[s] <= self.consumed:
                    self.current = s
                    return self.ring[s]
            try:
                self.consumed = self.inbox.recv()
            except EOFError:
                raise _ParentGone from None

    def locate(self, block: np.ndarray) -> tuple[int, int]:
        """(slot, first row) of a block that is a row range of one slot."""
        base = self.ring.__array_interface__["data"][0]
        offset = block.__array_interface__["data"][0] - base
        slot, rest = divmod(offset, self.ring[0].nbytes)
        row = rest // self.ring[0, 0].nbytes
        if offset < 0 or offset + block.nbytes > self.ring.nbytes:
            raise RuntimeError("a canvas block is not in the shared ring")
        return int(slot), int(row)


def _child(store_path: str, background: str, ring_fd: int, inbox_fd: int,
           outbox_fd: int) -> int:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(NICE)
    import numpy as np

    from stainctl.workspace.tilestore import TileStore

    inbox = Connection(inbox_fd, writable=False)
    outbox = Connection(outbox_fd, readable=False)
    try:
        from stainctl.stitch.blend import Canvas

        store = TileStore.open(Path(store_path), writable=False)
        lay = store.layout
        shape = (SLOTS, lay.side, lay.width, 3)
        written = inbox.recv()
        ring = _Ring(np.frombuffer(mmap.mmap(ring_fd, int(np.prod(shape))), np.uint8)
                     .reshape(shape), inbox)
        rgb = tuple(int(v) for v in background.split(","))
        canvas = Canvas(store, (rgb[0], rgb[1], rgb[2]), written, bands=ring.next_band)
        for i, block in enumerate(canvas.blocks()):
            slot, row = ring.locate(block)
            ring.last[slot] = i
            _send(outbox, (slot, row, len(block)))
        _send(outbox, None)
    except _ParentGone:
        return 0
    except BaseException as err:
        import traceback

        # The traceback does not travel with a pickled exception: `-v` shows it from the note.
        err.add_note("in the canvas process:\n" + traceback.format_exc())
        with contextlib.suppress(_ParentGone):
            try:
                _send(outbox, err)
            except _ParentGone:
                raise
            except Exception:  # an exception that does not pickle
                _send(outbox, RuntimeError(f"{type(err).__name__}: {err}"))
        return 1
    return 0


def _send(outbox: Connection, message: object) -> None:
    try:
        outbox.send(message)
    except (BrokenPipeError, ConnectionResetError):
        raise _ParentGone from None


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])))
