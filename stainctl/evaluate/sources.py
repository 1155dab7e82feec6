"""The image sets `evaluate` compares: folders of images, stitched slides, or workspaces.

Each set is a list of lazily loaded tiles with stable keys (for pairing and for showing the same
tile across models), so a set of thousands of 1024-px tiles never sits in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stainctl.errors import UsageError

if TYPE_CHECKING:
    from stainctl.slide.tiles import TileSource
    from stainctl.workspace.tilestore import TileStore
    from stainctl.workspace.workspace import Workspace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".tif", ".tiff", ".bif", ".vms", ".dcm")


@dataclass(frozen=True)
class SourceOptions:
    tile_size: int = 1024  # tiles sampled from slides, as in the CK7 study
    tile_mpp: float | None = None  # None: the slide's own level-0 resolution
    min_tissue: float = 0.5
    marker: str | None = None  # workspaces given as --fake: whose translated tiles


@dataclass(frozen=True)
class Item:
    key: str  # unique in its set: "<slide>/<tile>" or the image's path in its folder
    group: str  # slide key (or "" for folder images): for per-slide summaries
    load: Callable[[], np.ndarray] = field(compare=False, repr=False)
    # Tile-border lines inside this image (x columns, y rows), for the seam score.
    borders: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    path: Path | None = None  # the image file, for folder images (pairs CSV, landmarks)
    mpp: float | None = None  # µm/px of a tile from a slide or workspace (images: unknown)


@dataclass(frozen=True)
class SlidePreview:
    key: str
    ihc: Path  # the (virtual or real) IHC slide
    he: Path | None  # its H&E source, where known


@dataclass
class ImageSet:
    label: str
    path: Path
    kind: str  # folder | slide | workspace
    items: list[Item]
    previews: list[SlidePreview] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def open_set(path: str | Path, options: SourceOptions, *, fake: bool) -> ImageSet:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder; give a folder of images, a slide or a "
                         "workspace")
    from stainctl.workspace.workspace import Workspace

    if Workspace.exists_at(p):
        return _workspace_set(p, options, fake=fake)
    if p.is_dir():
        stitched = _stitched_in(p, options.marker)
        if stitched:
            return _slide_set(stitched, options, label=p.name, path=p)
        return _folder_set(p)
    return _slide_set([p], options, label=p.name, path=p)


def _stitched_in(folder: Path, marker: str | None) -> list[Path]:
    """The slides stainctl stitched, directly in `folder` (the main job's OUT, WS/outputs), of
    `marker` when given (named `KEY.<marker>.ome.tiff`, as a workspace's are found). Such a
    folder is read as those slides: as a folder of images it gave each whole slide as one image,
    beside its thumbnail, its H&E | IHC side-by-side PNG and the workspace's H&E thumbnails and
    tissue masks. Slides of several models without `marker` are refused: one set would mix
    them."""
    found = [(f, a) for f in sorted(folder.iterdir()) if f.suffix.lower() in (".tif", ".tiff")
             and "grid" in (a := stitched_annotations(f))]
    if marker:
        chosen = [f for f, _ in found if f".{marker}." in f.name]
        if found and not chosen:
            raise UsageError(f"{folder} holds no {marker} virtual slide (it holds "
                             f"{', '.join(f.name for f, _ in found)}); give the --marker they "
                             "were translated with")
        return chosen
    models = sorted({a.get("model", "?") for _, a in found})
    if len(models) > 1:
        raise UsageError(f"{folder} holds virtual slides of {len(models)} models "
                         f"({', '.join(models)}); choose one with --marker")
    return [f for f, _ in found]


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 of an image file (PNG/JPEG via OpenCV; TIFF via tifffile, OME included)."""
    import cv2

    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        if not _is_tiff(path):
            raise UsageError(f"{path}: not a TIFF image")
        arr = np.asarray(tifffile.imread(path, level=0, series=0))
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
    else:
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise UsageError(f"{path}: cannot be decoded as an image")
        arr = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB if raw.ndim == 3 and raw.shape[2] == 3
                           else cv2.COLOR_BGRA2RGB if raw.ndim == 3 else cv2.COLOR_GRAY2RGB)
    if arr.dtype != np.uint8:
        raise UsageError(f"{path}: {arr.dtype} pixels; evaluate needs 8-bit RGB images")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _is_tiff(path: Path) -> bool:
    from stainctl.slide.reader import TIFF_MAGIC

    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGIC


def _folder_set(folder: Path) -> ImageSet:
    files = sorted(f for f in folder.rglob("*")
                   if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                   and not any(part.endswith(".zarr") for part in f.parts))
    if not files:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    items = [Item(str(f.relative_to(folder).with_suffix("")), "", _loader(f), path=f)
             for f in files]
    return ImageSet(folder.name, folder, "folder", items)


def _loader(path: Path) -> Callable[[], np.ndarray]:
    return lambda: read_image(path)


# --- slides -----------------------------------------------------------------------------------
def _slide_set(paths: list[Path], options: SourceOptions, *, label: str, path: Path,
               previews: list[SlidePreview] | None = None) -> ImageSet:
    items: list[Item] = []
    for p in paths:
        items.extend(slide_tiles(p, options))
    if not items:
        raise UsageError(f"{path}: no tile of {options.tile_size} px with at least "
                         f"{options.min_tissue:.0%} tissue; lower --min-tissue or --tile-size")
    found = previews if previews is not None else [
        SlidePreview(p.name.split(".")[0], p, _source_of(p)) for p in paths]
    return ImageSet(label, path, "slide", items, found)


def slide_tiles(path: Path, options: SourceOptions) -> list[Item]:
    """Tiles of `tile_size` px on the tissue of a slide, row-major; stainctl's own outputs
    carry their tile grid, which gives each tile its seam lines."""
    from stainctl.slide.grid import GridParams, make_grid, tissue_fractions
    from stainctl.slide.reader import open_slide
    from stainctl.slide.thumbnail import read_thumbnail, thumbnail_mpp
    from stainctl.slide.tiles import TileSource
    from stainctl.slide.tissue import TissueParams, check_brightfield, tissue_mask

    slide = open_slide(path)
    try:
        mpp = slide.require_mpp()
        w0, h0 = slide.dimensions
        tmpp = thumbnail_mpp(mpp, w0, h0)
        thumb = read_thumbnail(slide, tmpp)
        check_brightfield(thumb, path, allow_dark=False)
        mask = tissue_mask(thumb, tmpp, TissueParams())
    finally:
        slide.close()
    target = options.tile_mpp or mpp
    grid = make_grid(w0, h0, mpp, GridParams(target, options.tile_size, 0, options.min_tissue))
    source = TileSource(str(path), grid.extent0, options.tile_size)
    lines = stitched_borders(path)
    scale = grid.extent0 / options.tile_size  # level-0 px per tile px
    # Sampled on the stitch's own grid, tile edges would coincide with its borders; half a
    # tile off, the borders fall inside the tiles, where their steps can be measured.
    shift = round(grid.extent0 / 2) if lines is not None else 0
    frac = tissue_fractions(mask, w0, h0, grid, offset=shift)
    xs, ys = grid.origins()
    xs, ys = xs + shift, ys + shift
    stem = path.name.split(".")[0]
    items = []
    for x, y, f in zip(xs, ys, frac, strict=True):
        if f < options.min_tissue or x + grid.extent0 > w0 or y + grid.extent0 > h0:
            continue  # partial edge tiles would bring glass padding into the statistics
        borders = None
        if lines is not None:
            borders = (_inside(lines[0], x, scale, options.tile_size),
                       _inside(lines[1], y, scale, options.tile_size))
        items.append(Item(f"{stem}/x{x}_y{y}", stem,
                          _tile_loader(source, int(x), int(y)), borders, mpp=target))
    return items


def _tile_loader(source: TileSource, x: int, y: int) -> Callable[[], np.ndarray]:
    return lambda: source.read(x, y)


def _inside(lines: np.ndarray, origin: int, scale: float, size: int) -> tuple[int, ...]:
    pos = np.round((lines - origin) / scale).astype(int)
    return tuple(int(p) for p in pos if 0 < p < size)


def stitched_borders(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Level-0 x and y of the tile borders of a slide stitched by stainctl (from the `grid`
    annotation it writes), else None."""
    meta = stitched_annotations(path)
    if "grid" not in meta:
        return None
    try:
        fields = dict(part.split("=", 1) for part in meta["grid"].split(","))
        stride, offset = float(fields["stride"]), float(fields["offset"])
        cols, rows = int(fields["cols"]), int(fields["rows"])
    except (KeyError, ValueError):
        return None
    xs = offset + stride * np.arange(1, cols)
    ys = offset + stride * np.arange(1, rows)
    return xs, ys


def stitched_annotations(path: Path) -> dict[str, str]:
    """The key-value annotations stainctl writes into a stitched slide (OME MapAnnotation or
    the plain TIFF description); {} for other files."""
    import xml.etree.ElementTree as ET

    import tifffile

    if not path.is_file() or not _is_tiff(path):
        return {}
    try:
        with tifffile.TiffFile(path) as tif:
            description = str(getattr(tif.pages[0], "description", "") or "")
    except (tifffile.TiffFileError, OSError, IndexError):
        return {}
    if description.lstrip().startswith("<?xml") and "stainctl" in description:
        try:
            root = ET.fromstring(description.encode())
        except ET.ParseError:
            return {}
        return {m.get("K", ""): m.text or "" for m in root.iter() if m.tag.endswith("}M")}
    if description.startswith("stainctl virtual"):
        parts = (p.strip() for p in description.split(";"))
        return dict(p.split("=", 1) for p in parts if "=" in p)
    return {}


def _source_of(path: Path) -> Path | None:
    source = stitched_annotations(path).get("source")
    return Path(source) if source and Path(source).exists() else None


# --- workspaces -------------------------------------------------------------------------------
def _workspace_set(root: Path, options: SourceOptions, *, fake: bool) -> ImageSet:
    from stainctl.workspace.workspace import Workspace

    ws = Workspace.open(root, readonly=True)  # an archived or read-only workspace works
    try:
        if fake:
            if not options.marker:
                raise UsageError(f"{root} is a workspace: name the translated tiles to evaluate "
                                 "with --marker")
            return _translated_set(ws, options.marker)
        return _kept_set(ws)
    finally:
        ws.close()


def _kept_set(ws: Workspace) -> ImageSet:
    """A workspace as real images: the tiles the quality filter kept."""
    from stainctl.slide.tiles import TileSource

    root, m = ws.root, ws.manifest
    items: list[Item] = []
    for s in m.slides():
        g = m.grid(s.id)
        if g is None:
            continue
        source = TileSource(s.path, g.extent0, g.tile_size)
        for t in m.kept_tiles(s.id):
            items.append(Item(f"{s.key}/c{t.col}_r{t.row}", s.key,
                              _tile_loader(source, t.x, t.y), mpp=g.target_mpp))
    if not items:
        raise UsageError(f"{root}: no kept tiles; run `stainctl tile` and `stainctl filter` on "
                         "the real slides first")
    return ImageSet(root.name, root, "workspace", items)


def _translated_set(ws: Workspace, marker: str) -> ImageSet:
    """A workspace as generated images: the translated tiles of `marker` (margins cropped)."""
    from stainctl.workspace.tilestore import TileStore

    root, m = ws.root, ws.manifest
    items: list[Item] = []
    previews: list[SlidePreview] = []
    for s in m.slides():
        path = ws.tile_store_path(s.key, marker)
        if not path.is_dir():
            continue
        store = TileStore.open(path, writable=False)
        written = store.written()
        for row, col in zip(*np.nonzero(written), strict=True):
            items.append(Item(f"{s.key}/c{col}_r{row}", s.key,
                              _store_loader(store, int(col), int(row)), mpp=store.layout.mpp))
        for a in m.artifacts(s.id, "stitched"):
            out = root / a.path  # an absolute path stays itself
            if f".{marker}." in out.name and out.exists():
                previews.append(SlidePreview(s.key, out, Path(s.path)))
                break
    if not items:
        raise UsageError(f"{root}: no translated {marker} tiles; run `stainctl translate -w "
                         f"{root} --marker {marker}` first")
    return ImageSet(f"{root.name}:{marker}", root, "workspace", items, previews)


def _store_loader(store: TileStore, col: int, row: int) -> Callable[[], np.ndarray]:
    """A tile of the (read-only) store without its margin; the store is opened once per slide,
    not per load (items are loaded several times: stats, pairs, retrieval, figures)."""
    margin, size = store.layout.margin, store.layout.tile_size

    def load() -> np.ndarray:
        tile = store.read(col, row)
        return np.ascontiguousarray(tile[margin:margin + size, margin:margin + size])

    return load


def resolution_caveat(sets: list[ImageSet]) -> str | None:
    """A sentence when the sets' tiles are at different µm/px (beyond 10 %): a real slide
    sampled at its own 0.23 µm/px against a workspace's 0.5 µm/px tiles compares
    magnifications as much as stains. Folder images have no known resolution."""
    found = {s.label: sorted({round(i.mpp, 4) for i in s.items if i.mpp}) for s in sets}
    every = [m for mpps in found.values() for m in mpps]
    if not every or max(every) <= 1.1 * min(every):
        return None
    listed = "; ".join(f"{label} {', '.join(f'{m:g}' for m in mpps)}"
                       for label, mpps in found.items() if mpps)
    return (f"the sets' tiles are at different resolutions (µm/px: {listed}): the metrics "
            "compare magnifications as much as stains; sample the slides at one resolution "
            f"with --tile-mpp (e.g. --tile-mpp {max(every):g}; a workspace's tiles stay at its "
            "grid's)")


def equal_subsets(sets: list[ImageSet], limit: int | None, seed: int = 0) -> list[list[Item]]:
    """The same number of items from every set, chosen deterministically: all of the smallest
    set (up to `limit`), a seeded sample of the larger ones, in key order."""
    n = min(len(s) for s in sets)
    if limit is not None:
        n = min(n, limit)
    out = []
    for s in sets:
        items = sorted(s.items, key=lambda i: i.key)
        if len(items) > n:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(len(items), size=n, replace=False))
            items = [items[i] for i in idx]
        out.append(items)
    return out


def crop_boxes(shape: tuple[int, int], size: int, count: int, seed: int,
               index: int) -> list[tuple[int, int, int]]:
    """`count` random square crops (y, x, side) of a (H, W) image: the same for the same seed
    and image index, whatever order images are processed in."""
    h, w = shape
    side = min(size, h, w)
    rng = np.random.default_rng([seed, index])
    ys = rng.integers(0, h - side + 1, size=count)
    xs = rng.integers(0, w - side + 1, size=count)
    return [(int(y), int(x), side) for y, x in zip(ys, xs, strict=True)]
