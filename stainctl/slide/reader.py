"""Open a slide with the first reader that accepts it, and read regions as RGB arrays.

OpenSlide first (SVS, NDPI, MRXS, DICOM, SCN, generic tiled TIFF, ...); tiffslide for the TIFFs
OpenSlide refuses (OME-TIFF); plain PNG/JPEG as one-level slides. Coordinates are level-0 pixels,
top-left. Areas outside the slide and transparent pixels read as white glass. Levels of TIFF-based
slides whose stored tiles stainctl can decode itself are read straight from those tiles
(`stainctl.slide.direct`, same pixels, several times faster); the library reads the rest.
"""

from __future__ import annotations

import logging
import math
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stainctl.errors import CORRUPT, MISSING, NO_MPP, UNSUPPORTED, SlideError
from stainctl.slide.direct import DirectReader, Unsupported, open_direct

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", *IMAGE_SUFFIXES,
}
# Above this a plain image is not loaded whole (decoding would need its full size in memory).
MAX_PLAIN_IMAGE_PIXELS = 400_000_000

log = logging.getLogger(__name__)


class _TifffileLog(logging.Handler):
    """tifffile reports some faults of a file only through `logging`, which with no handler of
    ours printed its raw line on stderr. They go into the reason of the slide being opened on
    this thread (`_tifffile_messages`), else to stainctl's debug log (-v)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        sink = getattr(self.local, "messages", None)
        if sink is not None:
            sink.append(record.getMessage())
        else:
            log.debug("tifffile: %s", record.getMessage())


_TIFFFILE_LOG = _TifffileLog()
_tifffile_logger = logging.getLogger("tifffile")
_tifffile_logger.addHandler(_TIFFFILE_LOG)
_tifffile_logger.propagate = False


@contextmanager
def _tifffile_messages() -> Iterator[list[str]]:
    """What tifffile logs on this thread inside the block."""
    messages: list[str] = []
    previous = getattr(_TIFFFILE_LOG.local, "messages", None)
    _TIFFFILE_LOG.local.messages = messages
    try:
        yield messages
    finally:
        _TIFFFILE_LOG.local.messages = previous


class _Backend(Protocol):
    @property
    def level_dimensions(self) -> Any: ...
    @property
    def level_downsamples(self) -> Any: ...

    def read_region(self, location: tuple[int, int], level: int,
                    size: tuple[int, int]) -> Any: ...

    def close(self) -> None: ...


@dataclass
class Slide:
    path: Path
    backend: str
    handle: _Backend
    vendor: str | None
    mpp: float | None
    mpp_source: str | None
    objective_power: float | None
    properties: dict[str, str] = field(repr=False, default_factory=dict)
    direct: DirectReader | None = field(repr=False, default=None)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(d[0]), int(d[1])) for d in self.handle.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self.handle.level_downsamples)

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise SlideError(self.path, f"{self.path}: the slide has no pixel size (mpp) in its "
                             "metadata; give it in an `mpp` column of a CSV slide list "
                             "(`path,mpp` rows), or with --mpp if every slide of the command "
                             "has that size (--mpp overrides them all)",
                             code=NO_MPP)
        return self.mpp

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (within
        SNAP_TOLERANCE: a level that close is read as it is, not resampled)."""
        from stainctl.slide.grid import SNAP_TOLERANCE

        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + SNAP_TOLERANCE):
                best = i
        return best

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `level`; (x, y) are level-0 pixels."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        direct = self.direct is not None and self.direct.serves(level)
        if direct:
            # The nearest level pixel: a grid origin round(L * ds) maps back to L exactly,
            # where flooring would step one pixel back at a non-integer downsample.
            lx, ly = round(x / ds), round(y / ds)
        else:
            lx, ly = math.floor(x / ds), math.floor(y / ds)
        # Clip to the level so no reader is asked for pixels outside the image.
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lw), min(ly + height, lh)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), 255, np.uint8)
        if direct:
            assert self.direct is not None
            try:
                region = self.direct.read(level, x0, y0, x1 - x0, y1 - y0)
            except Unsupported as err:
                self.direct.give_up(level, str(err))
                return self.read_region(x, y, level, width, height)
            except Exception as err:
                raise SlideError(self.path, f"{self.path}: could not read pixels "
                                 f"({type(err).__name__}: {err}); the file may be truncated "
                                 "or corrupt", CORRUPT) from err
            if (x0, y0, x1, y1) == (lx, ly, lx + width, ly + height):
                return region  # wholly inside: no white frame to paste into
            out = np.full((height, width, 3), 255, np.uint8)
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = region
            return out
        loc = (x if lx >= 0 else 0, y if ly >= 0 else 0)
        try:
            region = self.handle.read_region(loc, level, (x1 - x0, y1 - y0))
        except Exception as err:  # readers raise their own error types for corrupt data
            raise SlideError(self.path, f"{self.path}: could not read pixels "
                             f"({type(err).__name__}: {err}); the file may be truncated or "
                             "corrupt", CORRUPT) from err
        out = np.full((height, width, 3), 255, np.uint8)
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = _to_rgb_on_white(region)
        return out

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
        self.handle.close()

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "backend": self.backend, "vendor": self.vendor,
            "width": self.dimensions[0], "height": self.dimensions[1],
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp, "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
        }


def check_exists(path: Path) -> None:
    """A SlideError naming the whole path and why it cannot be reached (missing, a broken link,
    a loop of links, not permitted)."""
    import errno
    import os

    try:
        os.stat(path)
        return
    except OSError as err:
        cause = err
    if cause.errno == errno.ELOOP:
        reason = "a loop of symbolic links (a link that leads back to itself)"
    elif cause.errno == errno.ENOENT and path.is_symlink():
        reason = f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    elif cause.errno == errno.ENOENT:
        reason = "no such file or directory"
    else:
        reason = f"cannot be reached ({cause.strerror})"
    raise SlideError(path, f"{path}: {reason}", MISSING)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open `path`; `mpp` (µm/px) overrides the metadata. Raises SlideError with the reason,
    which names the path as given: the summary names a slide by its key (the file's stem),
    and "trunc: truncated" alone does not say which file to copy again."""
    path = Path(path)
    try:
        return _open_slide(path, mpp)
    except SlideError as err:
        if err.reason.startswith(str(path)):
            raise
        raise SlideError(path, f"{path}: {err.reason}", err.code) from err


def _open_slide(path: Path, mpp: float | None) -> Slide:
    check_exists(path)
    target = _dicom_member(path) if path.is_dir() else path
    if path.is_file() and path.suffix.lower() not in SLIDE_SUFFIXES:
        raise SlideError(path, f"unsupported file type {path.suffix!r}; stainctl reads "
                         "whole-slide formats (SVS, NDPI, MRXS, DICOM, TIFF/OME-TIFF) and PNG/JPEG",
                         UNSUPPORTED)
    if target.suffix.lower() in IMAGE_SUFFIXES:
        slide = _open_plain(path)
    else:
        slide = _open_wsi(path, target)
    if mpp is not None:
        if not mpp > 0:
            raise SlideError(path, f"--mpp must be positive, got {mpp}")
        slide.mpp, slide.mpp_source = float(mpp), "override"
    return slide


def _dicom_member(folder: Path) -> Path:
    members = sorted(folder.glob("*.dcm"))
    if not members:
        raise SlideError(folder, "a folder is read as a DICOM slide, but it has no .dcm files")
    return members[0]


def _open_wsi(path: Path, target: Path) -> Slide:
    import openslide

    try:
        handle = openslide.OpenSlide(str(target))
    except openslide.OpenSlideUnsupportedFormatError:
        truncated = _truncated_tiff(target)
        if truncated:  # OpenSlide calls a truncated TIFF "unsupported"; say what it is
            raise SlideError(path, truncated, CORRUPT) from None
        return _open_tiffslide(path, target)
    except openslide.OpenSlideError as err:
        raise SlideError(path, f"OpenSlide cannot read it ({err}); the file may be truncated "
                         "or corrupt", CORRUPT) from err
    props = dict(handle.properties)
    vendor = props.get("openslide.vendor")
    return Slide(
        path=path, backend="openslide", handle=_OpenSlideArrays(handle),
        vendor=vendor,
        mpp=_mpp(props.get("openslide.mpp-x"), props.get("openslide.mpp-y"), path),
        mpp_source="metadata" if props.get("openslide.mpp-x") else None,
        objective_power=_float(props.get("openslide.objective-power")), properties=props,
        direct=open_direct(target, handle.level_dimensions, vendor, "openslide"))


def _open_tiffslide(path: Path, target: Path) -> Slide:
    import tiffslide

    with _tifffile_messages() as messages:
        try:
            handle = tiffslide.TiffSlide(str(target))
            props = {k: str(v) for k, v in handle.properties.items() if v is not None}
            handle.level_dimensions  # noqa: B018  (forces tifffile to parse the pyramid now)
        except Exception as err:
            # tifffile's own account (logged) first: the exception that follows it is often
            # only its consequence (an empty page list indexed).
            detail = "; ".join(messages) or (
                "no image in it" if isinstance(err, IndexError) else str(err))
            raise SlideError(path, f"neither OpenSlide nor tiffslide can read it ({detail}); "
                             "the format is unsupported or the file is corrupt",
                             _unreadable_code(target)) from err
    mpp = _mpp(props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y"), path)
    vendor = props.get("tiffslide.vendor") or ("ome" if ".ome." in path.name.lower() else None)
    return Slide(
        path=path, backend="tiffslide", handle=handle, vendor=vendor,
        mpp=mpp, mpp_source="metadata" if mpp else None,
        objective_power=_float(props.get("tiffslide.objective-power")), properties=props,
        direct=open_direct(target, handle.level_dimensions, vendor, "tiffslide"))


TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF
_JP2_MAGIC = (b"\0\0\0\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")  # JP2 box, raw codestream


def _unreadable_code(path: Path) -> str | None:
    """The kind of failure of a file no reader accepts, from its first bytes, so the summary
    gives the right next step: a TIFF header means a damaged copy (CORRUPT); no TIFF, DICOM or
    JPEG 2000 magic at all means another format (UNSUPPORTED); otherwise we cannot tell."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if head.startswith(TIFF_MAGIC):
        return CORRUPT
    if head[128:132] == b"DICM" or head.startswith(_JP2_MAGIC):
        return None
    return UNSUPPORTED


def _truncated_tiff(path: Path) -> str | None:
    """The reason, when `path` is a TIFF whose header points past its end (a cut-off copy:
    TIFF writers such as Aperio's put the image directories after the pixels), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if head[:2] not in (b"II", b"MM"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    if len(head) < 8:
        return (f"the file is truncated or corrupt ({size} bytes, less than a TIFF header); "
                "copy it again from its source")
    version = struct.unpack(order + "H", head[2:4])[0]
    if version == 42:
        first = struct.unpack(order + "I", head[4:8])[0]
    elif version == 43 and len(head) >= 16:
        first = struct.unpack(order + "Q", head[8:16])[0]
    else:
        return None
    if first + 2 <= size:
        return None
    return (f"the file is truncated or corrupt: it ends at byte {size:,} but its first image "
            f"directory is at byte {first:,}; copy it again from its source (an interrupted "
            "transfer?)")


class _OpenSlideArrays:
    """OpenSlide read straight into a numpy buffer.

    The public `read_region` un-premultiplies into a PIL image, which then has to be copied
    into numpy: ~7 ms of a ~17 ms 512-px read here. The raw call fills premultiplied ARGB, which
    composes over white exactly with one add (bench/tile_filter.py measures the difference).
    """

    def __init__(self, handle: Any) -> None:
        from openslide import lowlevel

        self.handle = handle
        self._raw = getattr(lowlevel, "_read_region", None)
        self.level_dimensions = handle.level_dimensions
        self.level_downsamples = handle.level_downsamples
        self.properties = handle.properties

    def read_region(self, location: tuple[int, int], level: int,
                    size: tuple[int, int]) -> np.ndarray:
        import ctypes

        import cv2

        if self._raw is None or sys.byteorder != "little":
            return _to_rgb_on_white(self.handle.read_region(location, level, size))
        w, h = size
        buf = np.empty((h, w, 4), np.uint8)  # ARGB words = B, G, R, A bytes on little-endian
        self._raw(self.handle._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                  location[0], location[1], level, w, h)
        rgb = cv2.cvtColor(buf, cv2.COLOR_BGRA2RGB)
        alpha = buf[..., 3]
        if cv2.minMaxLoc(alpha)[0] < 255:  # premultiplied: over white is rgb + (255 - a)
            rgb = cv2.add(rgb, cv2.cvtColor(255 - alpha, cv2.COLOR_GRAY2RGB))
        return rgb

    def close(self) -> None:
        self.handle.close()


class _PlainImage:
    """A PNG/JPEG held in memory, with the reader interface of a one-level slide."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.level_dimensions = ((rgb.shape[1], rgb.shape[0]),)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, str] = {}

    def read_region(self, location: tuple[int, int], level: int,
                    size: tuple[int, int]) -> np.ndarray:
        x, y = location
        return self.rgb[y:y + size[1], x:x + size[0]]

    def close(self) -> None:
        pass


def _open_plain(path: Path) -> Slide:
    import cv2
    from PIL import Image, UnidentifiedImageError

    # Pillow reads only the header here, so an oversized image is refused before decoding.
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise SlideError(path, f"cannot read the image header ({err})", CORRUPT) from err
    if width * height > MAX_PLAIN_IMAGE_PIXELS:
        raise SlideError(path, "plain image too large to hold in memory; convert it to a "
                         "tiled pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`)")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (height, width):
        raise SlideError(path, "cannot decode the image (truncated or corrupt?)", CORRUPT)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    return Slide(path=path, backend="image", handle=_PlainImage(rgb), vendor=None, mpp=None,
                 mpp_source=None, objective_power=None)


def _to_rgb_on_white(region: Any) -> np.ndarray:
    arr = np.asarray(region)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        # Straight (not premultiplied) alpha, as PIL and tiffslide give it: compose over white.
        a = arr[..., 3:4].astype(np.float32) / 255
        return (arr[..., :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)
    return arr[..., :3]


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _mpp(mx: Any, my: Any, path: Path) -> float | None:
    x, y = _float(mx), _float(my)
    if x is None:
        return None
    y = y or x
    if abs(x - y) / x > 0.02:
        raise SlideError(path, f"non-square pixels ({x} x {y} µm) are not supported")
    return (x + y) / 2
