"""Keeping the C heap from growing with the slide (glibc's dynamic mmap threshold).

glibc serves a block of at least `M_MMAP_THRESHOLD` bytes (128 KiB) with its own mmap, returned to
the system on free. But each time such a block is freed the threshold rises to its size (up to
32 MiB), so after the first freed batch of tiles every tile-sized buffer (decoded tiles, batches,
blended overlaps, libvips' strips) comes from the arenas of the threads that allocate it, where
freed pieces are kept and fragment. Measured on the identity `normalize` job (tile, read, tile
store, stitch): peak RSS 922 MB at 0.25 gigapixel and 1,680 MB at 1 gigapixel, almost all of it
freed-but-kept heap (tracemalloc saw ~115 MB of Python/numpy memory at the peak). Fixing the
threshold at glibc's default turns the adjustment off, so those buffers go back to the system
when freed (bench/RESULTS.md, normalize and stitch sections of 2026-11-30).

Process-wide, set once at start-up by the CLI; a threshold the user set in the environment
(`MALLOC_MMAP_THRESHOLD_`) is kept. Other C libraries do nothing here.
"""

from __future__ import annotations

import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
THRESHOLD = 128 * 1024  # glibc's default, fixed instead of sliding up to 32 MiB


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not a glibc system
        return False


def bound_heap(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; True when it was set here."""
    if not glibc() or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
