"""The C heap does not keep freed tile-sized buffers (stainctl/heap.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stainctl.heap import bound_heap, glibc

# In a fresh process: free one large buffer (glibc then raises its mmap threshold to that size),
# then allocate tile-sized buffers with small live objects between them, free the buffers and
# see how much of them the process still holds.
PROBE = """
import sys
import numpy as np
from stainctl.heap import bound_heap

def anon_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

if sys.argv[1] == "bound":
    assert bound_heap()
big = np.ones(16 << 20, np.uint8)
del big
before = anon_mb()
tiles, alive = [], []
for _ in range(64):
    tiles.append(np.ones(576 * 576 * 3, np.uint8))  # one stored tile, ~1 MB
    alive.append(bytearray(4096))  # a small block after it keeps the heap from shrinking
del tiles
print(anon_mb() - before)
"""


def retained_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not glibc(), reason="the dynamic mmap threshold is glibc's")
def test_freed_tiles_go_back_to_the_system() -> None:
    # Without the fix the 64 MB of freed tiles stay in the process (the growth with the slide
    # area that bench/normalize.py measured); with it they are returned.
    assert retained_mb("default") > 32
    assert retained_mb("bound") < 8


def test_a_threshold_from_the_environment_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert bound_heap() is False
