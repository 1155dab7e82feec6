"""Write-then-rename, so a killed run never leaves a half-written file under its final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    The temporary name keeps the suffix, so writers that choose a codec from it (cv2, pyvips)
    still work.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale(final: str | os.PathLike[str]) -> None:
    """Delete temporaries that killed runs left beside `final` (the caller holds the writer
    lock, so none of them is still being written)."""
    final = Path(final)
    if final.parent.is_dir():
        for tmp in final.parent.glob(f".{final.stem}.tmp-*{final.suffix}"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
