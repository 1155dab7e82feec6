"""A workspace directory: its layout, its manifest, and one writer run at a time.

Every path inside the workspace and every manifest step name is derived here, and nowhere else:

    manifest.sqlite                              the manifest
    slides/<key>/thumbnail.png, tissue_mask.png  `tile`
    slides/<key>/embeddings/<encoder>.npy        `embed`: tokens, and <encoder>.tiles.npy, the
                                                 manifest tile id of each row
    slides/<key>/translated/<model>.zarr         `translate`: the tile store
    outputs/<key>.<marker><suffix>               `stitch` (unless -o), and its .png thumbnail
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stainctl.errors import UsageError
from stainctl.workspace.atomic import sweep_older
from stainctl.workspace.lock import WriterLock
from stainctl.workspace.manifest import Manifest

MANIFEST = "manifest.sqlite"


@dataclass(frozen=True)
class EmbeddingFiles:
    """One slide's embeddings for one encoder: row i of `tokens` is the tile whose manifest id
    is row i of `ids`."""

    tokens: Path
    ids: Path


@dataclass
class Workspace:
    root: Path
    manifest: Manifest
    run_id: int | None = None
    # Set by the caller when some slides failed: the run is then recorded as "partial".
    partial: bool = False

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, create: bool = False,
             readonly: bool = False) -> Workspace:
        """Open (or `create`) a workspace. `readonly`: for commands that only read; the manifest
        is opened read-only, so an archived or read-only workspace works."""
        root = Path(root).resolve()
        try:
            if create:
                root.mkdir(parents=True, exist_ok=True)
            return cls(root, Manifest(root / MANIFEST, create=create, readonly=readonly))
        except OSError as err:
            raise UsageError(_os_reason(root, err)) from None
        except sqlite3.OperationalError as err:
            if not os.access(root, os.W_OK) or not os.access(root / MANIFEST, os.W_OK):
                raise UsageError(
                    f"workspace {root} is read-only: this command writes to it; copy it to a "
                    "writable folder (`stainctl status` and `evaluate` read it as it is)") from None
            raise UsageError(f"workspace {root}: its manifest cannot be opened ({err}); "
                             "check the folder and its permissions") from None

    @staticmethod
    def exists_at(root: str | os.PathLike[str]) -> bool:
        """Whether `root` is a workspace (holds a manifest)."""
        return (Path(root) / MANIFEST).is_file()

    # --- step names: the manifest's `steps.step` values ---------------------------------------
    TILE: ClassVar[str] = "tile"
    FILTER: ClassVar[str] = "filter"

    @staticmethod
    def embed_step(encoder: str) -> str:
        return f"embed:{encoder}"

    @staticmethod
    def translate_step(model: str) -> str:
        return f"translate:{model}"

    @staticmethod
    def stitch_step(marker: str) -> str:
        return f"stitch:{marker}"

    @staticmethod
    def predict_step(model: str) -> str:
        return f"predict:{model}"

    # --- paths ------------------------------------------------------------------------------
    def slide_dir(self, key: str) -> Path:
        return self.root / "slides" / key

    def thumbnail_path(self, key: str) -> Path:
        """The H&E thumbnail `tile` saves (at the tissue detection's resolution)."""
        return self.slide_dir(key) / "thumbnail.png"

    def tissue_mask_path(self, key: str) -> Path:
        return self.slide_dir(key) / "tissue_mask.png"

    def embedding_files(self, key: str, encoder: str) -> EmbeddingFiles:
        base = self.slide_dir(key) / "embeddings"
        return EmbeddingFiles(base / f"{encoder}.npy", base / f"{encoder}.tiles.npy")

    def tile_store_path(self, key: str, marker: str) -> Path:
        """Where `translate` writes a slide's generated tiles for one marker."""
        return self.slide_dir(key) / "translated" / f"{marker}.zarr"

    def output_path(self, key: str, marker: str, suffix: str,
                    folder: Path | None = None) -> Path:
        """A stitched slide: in `folder` (-o), by default WS/outputs."""
        return (folder if folder is not None else self.root / "outputs") / f"{key}.{marker}{suffix}"

    def tile_stores(self, key: str) -> dict[str, Path]:
        """marker -> tile store path, for the stores a slide has."""
        base = self.slide_dir(key) / "translated"
        if not base.is_dir():
            return {}
        return {p.stem: p for p in sorted(base.glob("*.zarr")) if p.is_dir()}

    def relative(self, path: Path) -> str:
        """Path relative to the workspace when inside it, else absolute."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    @contextmanager
    def writing(self, command: str, params: Mapping[str, object], *,
                created: Sequence[Path] = ()) -> Iterator[Workspace]:
        """Hold the writer lock and record the run; the outcome is 'ok', 'partial' or the error.

        `created`: the workspace folder and the parents this run made for it (deepest first).
        A usage error before any slide was added (an unknown marker, missing weights) removes
        them, so no empty workspace is left to puzzle over or to pass by mistake as -w. Only
        while the lock is still held: a run refused by the lock never removes anything, as the
        workspace it thought it made is the live one of the run that holds the lock."""
        since = time.time()
        with WriterLock(self.root / ".lock", command):
            self.manifest.close_dead_runs()
            sweep_older(sorted((self.root / "slides").glob("*/")), since)
            self.run_id = self.manifest.start_run(
                command, params, _versions(), socket.gethostname(), os.getpid())
            outcome = "interrupted"
            self.partial = False
            discard = False
            try:
                yield self
                outcome = "partial" if self.partial else "ok"
            except Exception as err:
                outcome = f"error: {err}"
                discard = bool(created) and isinstance(err, UsageError) and \
                    not self.manifest.slides()
                raise
            finally:
                self.manifest.end_run(self.run_id, outcome)
                if discard:
                    self.close()
                    _remove_created(created)

    def close(self) -> None:
        self.manifest.close()


def _remove_created(created: Sequence[Path]) -> None:
    import shutil

    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:  # parents made for it, if nothing else went there since
        try:
            parent.rmdir()
        except OSError:
            break


def _os_reason(root: Path, err: OSError) -> str:
    where = err.filename or root
    return (f"workspace {root}: cannot use {where} ({err.strerror or err}); choose a writable "
            "folder with -w (or -o), or fix its permissions")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("stainctl", "openslide-python", "openslide-bin", "tiffslide", "tifffile",
                 "opencv-python-headless", "numpy", "dask"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
