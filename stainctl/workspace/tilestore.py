"""The translated-tile store: one generated RGB tile per grid tile, with its context margin.

A zarr v3 array of shape (rows, cols, side, side, 3), one chunk per tile. zarr writes each chunk to
a temporary name and renames it, so a tile is either fully written or absent, and a killed
`translate` resumes with the absent ones. The store's attributes carry its layout (where each
tile lies on the output canvas) and what made it (marker, model, source slide).

Coordinates here are pixels of the output canvas at the grid's target mpp, not level-0 pixels.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stainctl.errors import StainctlError

if TYPE_CHECKING:
    from stainctl.workspace.workspace import Workspace

ARRAY = "tiles"
FORMAT = "stainctl-tilestore/1"


class StoreError(StainctlError):
    pass


@dataclass(frozen=True)
class StoreLayout:
    width: int  # canvas size at `mpp`
    height: int
    mpp: float
    cols: int
    rows: int
    tile_size: int  # the grid tile, without margins
    overlap: int  # the grid's own overlap between neighbouring tiles
    margin: int  # context generated on each side of the grid tile

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def side(self) -> int:
        """Side of a stored tile: the grid tile plus a margin on each side."""
        return self.tile_size + 2 * self.margin

    @property
    def blend(self) -> int:
        """Width of the band that two neighbouring stored tiles share."""
        return self.side - self.stride

    def origin(self, col: int, row: int) -> tuple[int, int]:
        """Canvas (x, y) of a stored tile's top-left corner, margin included."""
        return col * self.stride - self.margin, row * self.stride - self.margin

    def borders(self) -> tuple[list[int], list[int]]:
        """Canvas x and y of the lines where neighbouring tiles meet (centres of the blend bands),
        inside the canvas: where a seam would show."""
        half = self.overlap // 2
        xs = [c * self.stride + half for c in range(1, self.cols)]
        ys = [r * self.stride + half for r in range(1, self.rows)]
        return [x for x in xs if x < self.width], [y for y in ys if y < self.height]

    def validate(self) -> None:
        if min(self.width, self.height, self.cols, self.rows, self.tile_size) < 1:
            raise StoreError(f"invalid tile store layout {self}")
        if self.margin < 0 or not 0 <= self.overlap < self.tile_size:
            raise StoreError(f"invalid margin or overlap in {self}")
        if self.blend > self.stride:
            # Beyond this a pixel would lie in three tiles along one axis; the separable blend
            # assumes at most two.
            raise StoreError(f"margin {self.margin} px is too wide for a tile stride of "
                             f"{self.stride} px (at most {(self.stride - self.overlap) // 2})")
        if (self.cols - 1) * self.stride + self.tile_size < self.width or \
                (self.rows - 1) * self.stride + self.tile_size < self.height:
            raise StoreError(f"the grid ({self.cols} x {self.rows} tiles) does not cover the "
                             f"{self.width} x {self.height} canvas")


def _plain_blosc_layout(meta: Any) -> bool:
    """True when chunks are single tiles at c/<row>/<col>/0/0/0, encoded bytes -> blosc."""
    try:
        names = [c.to_dict()["name"] for c in meta.codecs]
        encoding = meta.chunk_key_encoding.to_dict()
        chunks = tuple(meta.chunk_grid.chunk_shape)
    except (AttributeError, KeyError):
        return False
    return (names == ["bytes", "blosc"] and encoding["name"] == "default"
            and encoding.get("configuration", {}).get("separator") == "/"
            and chunks[:2] == (1, 1) and chunks[2:] == tuple(meta.shape[2:]))


def layout_for_grid(slide: Any, grid: Any, margin: int) -> StoreLayout:
    """The store layout for a slide's grid (manifest rows), with `margin` px of context."""
    scale = grid["target_mpp"] / slide["mpp"]
    return StoreLayout(
        width=max(1, round(slide["width"] / scale)), height=max(1, round(slide["height"] / scale)),
        mpp=float(grid["target_mpp"]), cols=int(grid["cols"]), rows=int(grid["rows"]),
        tile_size=int(grid["tile_size"]), overlap=int(grid["overlap"]), margin=margin)


class TileStore:
    """Write generated tiles in any order from any process; read them back by grid row."""

    def __init__(self, path: Path, array: Any) -> None:
        self.path = path
        self._array = array
        attrs = dict(array.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a stainctl tile store")
        self.layout = StoreLayout(**attrs["layout"])
        self.meta: dict[str, Any] = attrs.get("meta", {})
        self.generation: str = attrs["generation"]
        self._direct = _plain_blosc_layout(array.metadata)

    @classmethod
    def create(cls, path: str | os.PathLike[str], layout: StoreLayout,
               meta: dict[str, Any] | None = None, *, resume: bool = True) -> TileStore:
        """Create a store, or with `resume` reopen an existing one that has the same layout and
        meta (a different one is an error: remove it first, as `translate --force` does)."""
        import zarr
        from zarr.codecs import BloscCodec

        path = Path(path)
        layout.validate()
        meta = dict(meta or {})
        if path.exists():
            if resume:
                store = cls.open(path)
                if store.layout == layout and store.meta == meta:
                    return store
            raise StoreError(f"{path} holds tiles made with other settings; remove it (or run "
                             "with --force) to start again")
        s = layout.side
        # lz4 decodes at memory speed; stitching reads every tile once more.
        array = zarr.create_array(
            str(path), name=None, shape=(layout.rows, layout.cols, s, s, 3),
            chunks=(1, 1, s, s, 3), dtype="uint8", fill_value=0,
            compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
            chunk_key_encoding={"name": "default", "separator": "/"},
            attributes={"format": FORMAT, "layout": asdict(layout), "meta": meta,
                        "generation": uuid.uuid4().hex, "complete": False})
        return cls(path, array)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True) -> TileStore:
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no tile store at {path}")
        try:
            array = zarr.open_array(str(path), mode="r+" if writable else "r")
        except Exception as err:
            raise StoreError(f"cannot open the tile store {path}: {err}") from err
        return cls(path, array)

    @staticmethod
    def remove(path: str | os.PathLike[str]) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # --- writing (translate) ----------------------------------------------------------------
    def write(self, col: int, row: int, tile: np.ndarray) -> None:
        s = self.layout.side
        if tile.shape != (s, s, 3) or tile.dtype != np.uint8:
            raise StoreError(f"a tile must be uint8 ({s}, {s}, 3), got {tile.dtype} {tile.shape}")
        if not (0 <= col < self.layout.cols and 0 <= row < self.layout.rows):
            raise StoreError(f"tile ({col}, {row}) is outside the {self.layout.cols} x "
                             f"{self.layout.rows} grid")
        self._array[row, col] = tile

    def finish(self) -> None:
        """Mark the store complete: every tile the producer meant to write is written."""
        self._array.attrs["complete"] = True

    @property
    def complete(self) -> bool:
        return bool(self._array.attrs.get("complete", False))

    # --- reading (stitch) -------------------------------------------------------------------
    def written(self) -> np.ndarray:
        """Boolean (rows, cols): which tiles are present. Read from the chunk files themselves
        (zarr v3 default key encoding c/<row>/<col>/0/0/0), so it is true after any crash."""
        mask = np.zeros((self.layout.rows, self.layout.cols), bool)
        base = self.path / "c"
        if not base.is_dir():
            return mask
        for rdir in os.scandir(base):
            if not rdir.name.isdigit():
                continue
            for cdir in os.scandir(rdir.path):
                if cdir.name.isdigit() and os.path.exists(os.path.join(cdir.path, "0", "0", "0")):
                    mask[int(rdir.name), int(cdir.name)] = True
        return mask

    def read(self, col: int, row: int) -> np.ndarray:
        return np.asarray(self._array[row, col])

    def read_row(self, row: int, out: np.ndarray | None = None) -> np.ndarray:
        """All tiles of one grid row, (cols, side, side, 3); absent tiles read as zeros.

        With `out` (a C-contiguous uint8 array of that shape), the row is decoded into it: reusing
        one buffer saves a copy and the page faults of a fresh ~100 MB array per row."""
        if out is None:
            out = np.empty((self.layout.cols, *self._array.shape[2:]), np.uint8)
        if self._direct:
            return self._read_row_direct(row, out)
        from zarr.core.buffer import default_buffer_prototype

        target = default_buffer_prototype().nd_buffer.from_numpy_array(out)
        self._array.get_basic_selection((row,), out=target)
        return out

    def _read_row_direct(self, row: int, out: np.ndarray) -> np.ndarray:
        """Decode the row's chunk files straight into `out` with numcodecs' Blosc, the codec zarr
        itself uses: zarr's asynchronous machinery costs ~1 ms per chunk here, three times the
        decoding, and stitching reads every tile. Only for stores laid out as `create` makes
        them (checked in `__init__`); a test checks it reads what zarr reads."""
        from numcodecs import Blosc

        codec = Blosc()
        base = self.path / "c" / str(row)
        for col in range(self.layout.cols):
            try:
                blob = (base / str(col) / "0" / "0" / "0").read_bytes()
            except FileNotFoundError:
                out[col] = 0
                continue
            codec.decode(blob, out=out[col])
        return out


def create_for_slide(ws: Workspace, slide: Any, marker: str, margin: int,
                     meta: dict[str, Any] | None = None) -> TileStore:
    """The store `translate` fills for one slide and marker (created, or reopened to resume),
    recorded in the manifest. `slide` is the manifest row of a tiled slide."""
    from stainctl.errors import UsageError

    if not marker.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"a marker name may hold letters, digits, - and _ only: {marker!r}")
    grid = ws.manifest.grid(slide["id"])
    if grid is None:
        raise StoreError(f"{slide['path']} has no tile grid yet; run `stainctl tile` first")
    path = ws.tile_store_path(slide["key"], marker)
    full_meta = {"marker": marker, "slide": slide["path"], "grid": grid["params_hash"],
                 **(meta or {})}
    store = TileStore.create(path, layout_for_grid(slide, grid, margin), full_meta)
    ws.manifest.record_artifact(slide["id"], "tile_store", ws.relative(path))
    return store
