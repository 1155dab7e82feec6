"""A cheap content fingerprint: size plus hashes of the first and last MiB of each file.

Hashing whole slides (gigabytes each, hundreds a night) would dominate a batch; a rescan or
a replaced file changes size or head/tail in practice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def fingerprint(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(CHUNK))
            if size > CHUNK:
                fh.seek(max(CHUNK, size - CHUNK), os.SEEK_SET)
                h.update(fh.read(CHUNK))
    return h.hexdigest()[:32]
