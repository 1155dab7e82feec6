"""An output folder checked before any work: a read-only or misplaced `-o` is one usage line
(exit 2) at the start, not a per-slide "unexpected error" after the translation or readout
it was meant to hold. Nothing is created here (a usage error leaves nothing behind): the
folder's nearest existing ancestor must be a folder this process may write in."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from stainctl.errors import UsageError


def check_output_folder(path: Path, option: str, given: Path | None = None) -> None:
    """Raise UsageError naming `option` and what was `given` for it (default `path`) when a
    folder cannot be made or written at `path`."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"{option} {given or path}"
    if not existing.is_dir():
        raise UsageError(f"{where}: {existing} is a file, not a folder; give a folder path")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    cause = os.strerror(errno.EACCES)  # worded as the OS words it ("Permission denied")
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            cause = os.strerror(errno.EROFS)
    except OSError:
        pass
    raise UsageError(f"{where}: cannot write in {existing} ({cause}); choose a writable folder "
                     "or fix its permissions")
