"""The translated-tile store: one generated RGB tile per grid tile, with its context margin.

A zarr v3 array of shape (rows, cols, side, side, 3), one chunk per tile. zarr writes each chunk to
a temporary name and renames it, so a tile is either fully written or absent, and a killed
`translate` resumes with the absent ones. The store's attributes carry its layout (where each
tile lies on the output canvas) and what made it (marker, model, source slide).

Coordinates here are pixels of the output canvas at the grid's target mpp, not level-0 pixels.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.errors import StainctlError

if TYPE_CHECKING:
    from numcodecs.blosc import Blosc
    from zarr.core.common import JSON
    from zarr.types import AnyArray

    from stainctl.workspace.records import GridRecord, SlideRecord
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

    @classmethod
    def from_attrs(cls, path: Path, attrs: Mapping[str, object]) -> StoreLayout:
        """The layout a store's attributes hold."""
        values: dict[str, int | float] = {}
        for f in fields(cls):
            v = attrs.get(f.name)
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise StoreError(f"{path}: the tile store's layout has no valid {f.name}")
            values[f.name] = v
        return cls(width=int(values["width"]), height=int(values["height"]),
                   mpp=float(values["mpp"]), cols=int(values["cols"]), rows=int(values["rows"]),
                   tile_size=int(values["tile_size"]), overlap=int(values["overlap"]),
                   margin=int(values["margin"]))

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


def _plain_blosc_attrs(zarr_json: Path) -> dict[str, object] | None:
    """The attributes in a zarr.json of an array laid out as `TileStore.create` makes it
    (`_plain_blosc`); else None."""
    import json

    try:
        meta = json.loads(zarr_json.read_text())
    except (OSError, ValueError):
        return None
    return _plain_blosc(meta)


def _plain_blosc(meta: object) -> dict[str, object] | None:
    """The attributes of zarr v3 array metadata (zarr.json's, or zarr's own as a dict) laid
    out as `TileStore.create` makes it (uint8, fill 0, one chunk per tile at c/<row>/<col>/0/0/0,
    bytes -> blosc), whose chunk files stainctl can decode itself; else None."""
    if not isinstance(meta, dict):
        return None
    try:
        shape, grid = meta["shape"], meta["chunk_grid"]
        encoding, codecs = meta["chunk_key_encoding"], meta["codecs"]
        chunks = tuple(grid["configuration"]["chunk_shape"])
        plain = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
                 and meta.get("data_type") == "uint8" and meta.get("fill_value") == 0
                 and grid.get("name") == "regular" and len(shape) == 5
                 and [c.get("name") for c in codecs] == ["bytes", "blosc"]
                 and encoding.get("name") == "default"
                 and (encoding.get("configuration") or {}).get("separator") == "/"
                 and chunks[:2] == (1, 1) and chunks[2:] == tuple(shape[2:]))
        attrs = meta.get("attributes")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return dict(attrs) if plain and isinstance(attrs, dict) else None


def _json(meta: Mapping[str, object]) -> JSON:
    """`meta` as zarr attributes take it (a JSON round trip: what a reopened store reads)."""
    import json

    value: JSON = json.loads(json.dumps(dict(meta)))
    return value


def layout_for_grid(slide: SlideRecord, grid: GridRecord, margin: int) -> StoreLayout:
    """The store layout for a slide's grid, with `margin` px of context."""
    if slide.mpp is None or slide.width is None or slide.height is None:
        raise StoreError(f"{slide.path} has no size or pixel size in the manifest; run "
                         "`stainctl tile --force` on it")
    scale = grid.target_mpp / slide.mpp
    return StoreLayout(
        width=max(1, round(slide.width / scale)), height=max(1, round(slide.height / scale)),
        mpp=grid.target_mpp, cols=grid.cols, rows=grid.rows, tile_size=grid.tile_size,
        overlap=grid.overlap, margin=margin)


class TileStore:
    """Write generated tiles in any order from any process; read them back by grid row."""

    def __init__(self, path: Path, array: AnyArray | None,
                 attrs: Mapping[str, object] | None = None) -> None:
        """`array` None: a read-only store laid out as `create` makes them, whose `attrs` were
        read from its zarr.json; zarr is then opened only if something needs it."""
        self.path = path
        self._zarr = array
        attrs = dict(array.attrs) if array is not None else dict(attrs or {})
        self._attrs = attrs
        layout, meta, generation = attrs.get("layout"), attrs.get("meta", {}), \
            attrs.get("generation")
        if (attrs.get("format") != FORMAT or not isinstance(layout, dict)
                or not isinstance(meta, dict) or not isinstance(generation, str)):
            raise StoreError(f"{path} is not a stainctl tile store")
        self.layout = StoreLayout.from_attrs(path, layout)
        self.meta: dict[str, object] = dict(meta)
        self.generation = generation
        # From the metadata zarr already read (a writable store): zarr.json is read once.
        self._direct = array is None or _plain_blosc(array.metadata.to_dict()) is not None

    @property
    def _array(self) -> AnyArray:
        if self._zarr is None:
            import zarr

            self._zarr = zarr.open_array(str(self.path), mode="r")
        return self._zarr

    @classmethod
    def create(cls, path: str | os.PathLike[str], layout: StoreLayout,
               meta: Mapping[str, object] | None = None, *, resume: bool = True) -> TileStore:
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
            attributes={"format": FORMAT, "layout": asdict(layout), "meta": _json(meta),
                        "generation": uuid.uuid4().hex, "complete": False})
        return cls(path, array)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True) -> TileStore:
        """Open a store. Read-only, a store laid out as `create` makes them is read from its
        zarr.json without importing zarr (~0.2 s of a stitch process's start-up)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no tile store at {path}")
        if not writable:
            attrs = _plain_blosc_attrs(path / "zarr.json")
            if attrs is not None:
                return cls(path, None, attrs)
        import zarr

        try:
            array = zarr.open_array(str(path), mode="r+" if writable else "r")
        except Exception as err:
            raise StoreError(f"cannot open the tile store {path}: {err}") from err
        return cls(path, array)

    @staticmethod
    def remove(path: str | os.PathLike[str]) -> None:
        shutil.rmtree(path, ignore_errors=True)

    # --- writing (translate) ----------------------------------------------------------------
    def write(self, col: int, row: int, tile: NDArray[np.uint8]) -> None:
        s = self.layout.side
        if tile.shape != (s, s, 3) or tile.dtype != np.uint8:
            raise StoreError(f"a tile must be uint8 ({s}, {s}, 3), got {tile.dtype} {tile.shape}")
        if not (0 <= col < self.layout.cols and 0 <= row < self.layout.rows):
            raise StoreError(f"tile ({col}, {row}) is outside the {self.layout.cols} x "
                             f"{self.layout.rows} grid")
        if not self._direct:
            self._array[row, col] = tile
            return
        # The chunk file encoded and renamed into place here, as zarr would write it (same
        # Blosc frame; a test checks zarr reads it): zarr's asynchronous write path held ~2 ms
        # of interpreter time a tile, so eight writer threads managed 435 tiles/s on a 16-core
        # machine, below what a GPU makes (bench/RESULTS.md, GPU figures).
        blob = _blosc().encode(np.ascontiguousarray(tile))
        final = chunk_file(self.path, col, row)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Unique across threads, processes and the hosts of a cluster sharing the store.
        tmp = final.with_name(f".0.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, final)
        except OSError as err:  # a full disk names the store's file, not the temporary
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise OSError(err.errno, err.strerror, os.fspath(final)) from err

    def finish(self) -> None:
        """Mark the store complete: every tile the producer meant to write is written."""
        self._array.attrs["complete"] = True

    @property
    def complete(self) -> bool:
        if self._zarr is None:
            return bool(self._attrs.get("complete", False))
        return bool(self._zarr.attrs.get("complete", False))

    # --- reading (stitch) -------------------------------------------------------------------
    def written(self) -> NDArray[np.bool_]:
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

    def read(self, col: int, row: int) -> NDArray[np.uint8]:
        s = self.layout.side
        return self.read_into(col, row, np.empty((s, s, 3), np.uint8))

    def read_into(self, col: int, row: int, out: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """One tile decoded into `out` (C-contiguous uint8, (side, side, 3)); absent: zeros.
        Stitching holds two tiles this way instead of a whole decoded row (~1 band of canvas,
        ~80 MB at 40k px wide)."""
        if not self._direct:
            out[...] = self._array[row, col]
            return out
        # The chunk file decoded straight into `out` with numcodecs' Blosc, the codec zarr
        # itself uses: zarr's asynchronous machinery costs ~1 ms per chunk, three times the
        # decoding, and stitching reads every tile. Only for stores laid out as `create` makes
        # them (checked in `__init__`); a test checks it reads what zarr reads.
        try:
            blob = chunk_file(self.path, col, row).read_bytes()
        except FileNotFoundError:
            out[...] = 0
            return out
        try:
            _blosc().decode(blob, out=out)
        except (RuntimeError, ValueError) as err:  # a damaged or foreign chunk file
            raise StoreError(f"tile ({col}, {row}) of {self.path} is damaged ({err}); run "
                             "`stainctl translate --force` for this slide") from err
        return out


@functools.cache
def _blosc() -> Blosc:
    """numcodecs' Blosc (made once), decoding on the calling thread. Called from a main thread,
    Blosc would decode each tile with its own pool of threads, slower in both wall and CPU time
    for tiles of this size (1,600 tiles: 0.36 s against 0.25 s, `bench/tilestore_read.py`),
    and the callers already spread tiles over threads or processes. The switch is
    process-wide: encoding, as zarr's writer does, was measured no slower without the pool."""
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False
    return numcodecs.blosc.Blosc()


def chunk_file(store: Path, col: int, row: int) -> Path:
    """The file of tile (col, row) in a store as `create` lays it out (zarr v3's default key
    encoding, one chunk per tile): present once the tile is written, atomically."""
    return store / "c" / str(row) / str(col) / "0" / "0" / "0"


def create_for_slide(ws: Workspace, slide: SlideRecord, marker: str, margin: int,
                     meta: Mapping[str, object] | None = None) -> TileStore:
    """The store `translate` fills for one slide and marker (created, or reopened to resume),
    recorded in the manifest. `slide` is a tiled slide."""
    from stainctl.errors import UsageError
    from stainctl.models.card import NAME_RULE, valid_name

    if not valid_name(marker):
        raise UsageError(f"{NAME_RULE}: {marker!r}")
    grid = ws.manifest.grid(slide.id)
    if grid is None:
        raise StoreError(f"{slide.path} has no tile grid yet; run `stainctl tile` first")
    path = ws.tile_store_path(slide.key, marker)
    full_meta = {"marker": marker, "slide": slide.path, "grid": grid.params_hash,
                 **(meta or {})}
    store = TileStore.create(path, layout_for_grid(slide, grid, margin), full_meta)
    ws.manifest.record_artifact(slide.id, "tile_store", ws.relative(path))
    return store
