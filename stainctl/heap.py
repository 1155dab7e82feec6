"""Giving freed memory back to the system while a slide is worked on (glibc `malloc_trim`).

glibc serves a block of at least 128 KiB with its own mmap, returned on free; but each time such
a block is freed that threshold rises to the block's size (up to 32 MiB), so after the first freed
batch every tile-sized buffer (decoded tiles, batches, blended overlaps, libvips' strips) comes
from the arenas of the threads that allocate it, where freed pieces are kept and fragment. That
made peak RSS grow with the slide area: the identity `normalize` job (tile, read, tile store,
stitch) peaked at 916 MB on a 0.25-gigapixel slide and 1,673 MB at 1 gigapixel, while
tracemalloc saw ~115 MB of Python/numpy memory at the peak. Trimming the arenas between batches
of tiles and bands of the canvas, at most once a second, gave 717 and 918 MB at no measured cost
in time; fixing the mmap threshold instead (mallopt) gave 614 and 841 MB but took 50-70 % longer
(page faults on every buffer). bench/RESULTS.md, normalize and stitch sections of 2026-11-30.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

EVERY = 1.0  # seconds between trims: a trim walks every arena (~ms), the work between is ~s

_lock = threading.Lock()
_last = float("-inf")


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not a glibc system
        return False


@functools.cache
def _libc() -> Any:
    """The C library's handle, loaded once, on first use; None off glibc."""
    if not glibc():
        return None
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def trim(every: float = EVERY) -> bool:
    """Return the free pages of every malloc arena to the system, unless that was done less than
    `every` seconds ago (by any thread); True when it ran. A no-op off glibc."""
    global _last
    libc = _libc()
    if libc is None:
        return False
    now = time.monotonic()
    with _lock:
        if now - _last < every:
            return False
        _last = now
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True


def single_arena() -> bool:
    """From now on, threads that allocate share glibc's main arena instead of getting arenas of
    their own (mallopt M_ARENA_MAX = 1); True where that was set. A thread arena keeps the
    freed tile-sized blocks of its thread, fragmented by the small long-lived objects made
    between them, so a readout's peak RSS crept up by ~10 kB a tile (146 -> 178 MB over
    3,249 tiles); with one arena it stayed at 152-153 MB, in the same time (bench/RESULTS.md,
    readout, lead, 2026-11-30). Arenas made before the call stay."""
    libc = _libc()
    if libc is None:
        return False
    M_ARENA_MAX = -8  # glibc's malloc.h
    try:
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except AttributeError:
        return False
