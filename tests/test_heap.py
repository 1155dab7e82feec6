"""Freed tile-sized buffers go back to the system (stainctl/heap.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stainctl import heap

# In a fresh process: free one large buffer (glibc then raises its mmap threshold to that size),
# allocate tile-sized buffers with small live objects between them, free the buffers and see how
# much of them the process still holds, with and without a trim.
PROBE = """
import sys
import numpy as np
from stainctl import heap

def anon_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

big = np.ones(16 << 20, np.uint8)
del big
before = anon_mb()
tiles, alive = [], []
for _ in range(64):
    tiles.append(np.ones(576 * 576 * 3, np.uint8))  # one stored tile, ~1 MB
    alive.append(bytearray(4096))  # a small block after it keeps the heap from shrinking
del tiles
if sys.argv[1] == "trim":
    assert heap.trim(every=0.0)
print(anon_mb() - before)
"""


def retained_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not heap.glibc(), reason="the arenas trimmed are glibc's")
def test_freed_tiles_go_back_to_the_system() -> None:
    # Without a trim the 64 MB of freed tiles stay in the process (what made bench/normalize.py's
    # peak RSS grow with the slide area); a trim returns them.
    assert retained_mb("keep") > 32
    assert retained_mb("trim") < 8


def test_trims_are_spaced() -> None:
    heap.trim(every=0.0)
    assert heap.trim(every=3600.0) is False  # the one just done is recent


def test_libc_is_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """trim and single_arena share one handle of the C library, loaded on first use."""
    import ctypes

    calls: list[tuple[str, tuple[int, ...]]] = []

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(("malloc_trim", (pad,)))
            return 1

        def mallopt(self, param: int, value: int) -> int:
            calls.append(("mallopt", (param, value)))
            return 1

    loads: list[object] = []

    def cdll(name: object) -> Libc:
        loads.append(name)
        return Libc()

    monkeypatch.setattr(heap, "glibc", lambda: True)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    heap._libc.cache_clear()
    try:
        assert heap.trim(every=0.0) and heap.trim(every=0.0) and heap.single_arena()
    finally:
        heap._libc.cache_clear()  # the real library for the tests after this one
    assert loads == [None]
    assert calls == [("malloc_trim", (0,)), ("malloc_trim", (0,)), ("mallopt", (-8, 1))]
