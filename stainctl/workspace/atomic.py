"""Write-then-rename, so a killed run never leaves a half-written file under its final name."""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stainctl.workspace.lock import pid_alive

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    The temporary name keeps the suffix, so writers that choose a codec from it (cv2, pyvips)
    still work, and carries the writer's pid, so temporaries that killed runs left beside
    `final` are removed here (`remove_stale`) while a live writer's are kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = temp_path(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def temp_path(final: Path) -> Path:
    """The temporary `atomic_path` writes `final` through in this process."""
    return final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")


def atomic_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """`data` written to `final` whole or not at all. An OSError (a full disk) names `final`,
    not the temporary: a message must say which file to free space for."""
    with atomic_path(final) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as err:
            raise OSError(err.errno, err.strerror, os.fspath(final)) from err


def atomic_png(final: str | os.PathLike[str], image: NDArray[np.uint8],
               compression: int | None = None) -> None:
    """An RGB (or grey) uint8 image written to `final` as PNG, whole or not at all; zlib level
    `compression`, else OpenCV's default. Encoded in memory and written by Python: cv2.imwrite
    on a full disk printed libpng's "Write Error" and returned False, hiding the cause (ENOSPC)
    from the message."""
    import cv2
    import numpy as np

    bgr = image[..., ::-1] if image.ndim == 3 else image
    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, compression]
    ok, png = cv2.imencode(".png", np.ascontiguousarray(bgr), params)
    if not ok:
        raise OSError(f"could not encode {final} as PNG")
    atomic_bytes(final, png.tobytes())


TEMP_NAME = re.compile(r"\..+\.tmp-\d+(\.[^.]*)?")


def sweep_older(folders: list[Path], before: float) -> list[Path]:
    """Delete temporaries in `folders` last written before `before` (a time.time()): called by
    the holder of a workspace's lock, for which every older temporary of the workspace is a dead
    run's, whatever its pid now names (reused pids, other pid namespaces)."""
    removed: list[Path] = []
    for folder in folders:
        for tmp in folder.glob(".*.tmp-*"):
            try:
                if TEMP_NAME.fullmatch(tmp.name) and tmp.is_file() \
                        and tmp.stat().st_mtime < before:
                    tmp.unlink()
                    removed.append(tmp)
            except FileNotFoundError:
                continue
    return removed


def remove_stale(final: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries beside `final` whose writer is dead (the pid in the name is no
    live process of this host); return them. Another live process may be writing the same name
    (two workspaces stitching into one output folder), so its temporary is left alone."""
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(final.stem)}\.tmp-(\d+){re.escape(final.suffix)}")
    for tmp in final.parent.glob(f".{glob.escape(final.stem)}.tmp-*{glob.escape(final.suffix)}"):
        match = pattern.fullmatch(tmp.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed

