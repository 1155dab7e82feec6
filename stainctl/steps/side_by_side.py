"""The H&E | virtual IHC PNG the main job writes beside each output, large enough to judge a stain.

Top row: the whole H&E slide and the whole virtual slide, each PANEL px wide (2,048 px with the
gap; smaller slides at their own size, very tall ones at most PANEL_HEIGHT high). Bottom row: the
same field of the densest tissue from both, at the output's full resolution, so cells can be
compared. A frame on the overviews marks where the field is. Measured on the CMU-1 sample:
2,048 x 2,139 px, 5.6 MB (full-resolution tissue costs about 2.2 bytes per px in PNG, so the
field is kept to 768 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from stainctl.slide.thumbnail import DEFAULT_MAX_READ_GPX
from stainctl.workspace import atomic_png

if TYPE_CHECKING:
    import pyvips
from stainctl.workspace.atomic import remove_stale

PANEL = 1020  # two panels and the gap: a 2,048-px-wide overview
PANEL_HEIGHT = 1536
GAP = 8
CROP = 768  # the full-resolution field, px at the output's resolution
FRAME = (0, 0, 0)


def side_by_side(slide_path: str, slide_mpp: float, output: Path, thumbnail: Path,
                 marker: str, *, unchanged: bool = False,
                 max_read_gpx: float = DEFAULT_MAX_READ_GPX,
                 labels: tuple[str, str] | None = None,
                 target: NDArray[np.uint8] | None = None,
                 target_label: str = "target") -> Path:
    """Write `<thumbnail stem>.side-by-side.png` beside `output` (a stitched slide of the H&E
    at `slide_path`, whose level-0 pixel size is `slide_mpp`) and return its path. With
    `unchanged` (the output was not remade) an existing one is kept as it is. `labels` name
    the input and the output panels (default H&E, virtual MARKER); `target` (an image at the
    output's resolution, e.g. a normalisation's reference) is shown third, whole above and a
    field of it at full resolution below."""
    import cv2
    import pyvips

    path = side_by_side_path(thumbnail)
    if unchanged and _newer_than(path, output, thumbnail):
        remove_stale(path)  # what a killed run left beside it
        return path

    from stainctl.slide.reader import open_slide
    from stainctl.slide.thumbnail import read_thumbnail
    from stainctl.slide.tiles import read_tile

    virtual = pyvips.Image.new_from_file(str(output))  # level 0
    cw, ch = virtual.width, virtual.height
    pw = min(PANEL, cw, max(1, round(PANEL_HEIGHT * cw / ch)))
    ph = max(1, round(ch * pw / cw))
    v_over = _rgb(pyvips.Image.thumbnail(str(output), pw, height=ph, size="force"))
    slide = open_slide(slide_path, slide_mpp)
    try:
        w0, _h0 = slide.dimensions
        he_over = read_thumbnail(slide, slide_mpp * w0 / pw, max_read_gpx=max_read_gpx)
        he_over = cv2.resize(he_over, (pw, ph), interpolation=cv2.INTER_AREA)
        side = min(CROP, cw, ch)
        x, y = densest_field(he_over, round(side * pw / cw), cw / pw, (cw, ch), side)
        s0 = w0 / cw  # level-0 px per output px
        he_crop = read_tile(slide, round(x * s0), round(y * s0), side * s0, side)
    finally:
        slide.close()
    v_crop = _rgb(virtual.crop(x, y, side, side))
    box = (round(x * pw / cw), round(y * pw / cw), round(side * pw / cw))
    left, right = labels or ("H&E", f"virtual {marker}")
    overviews = [_label(_frame(im, box), text)
                 for im, text in ((he_over, left), (v_over, right))]
    fields = [_label(he_crop, f"{left}, full resolution"),
              _label(v_crop, f"{right}, full resolution")]
    if target is not None:
        th, tw = target.shape[:2]
        f = min(pw / tw, ph / th, 1.0)
        overviews.append(_label(cv2.resize(np.ascontiguousarray(target[..., :3]),
                                           (max(1, round(tw * f)), max(1, round(th * f))),
                                           interpolation=cv2.INTER_AREA), target_label))
        ty, tx = max(0, (th - side) // 2), max(0, (tw - side) // 2)
        fields.append(_label(np.ascontiguousarray(target[ty:ty + side, tx:tx + side, :3]),
                             f"{target_label}, full resolution"))
    top = _row(overviews)
    bottom = _row(fields)
    width = max(top.shape[1], bottom.shape[1])
    sheet = np.vstack([_pad(top, width), np.full((GAP, width, 3), 255, np.uint8),
                       _pad(bottom, width)])
    atomic_png(path, sheet, compression=6)
    return path


def side_by_side_errors() -> tuple[type[Exception], ...]:
    """What writing the PNG can meet that is about its files, not a bug: a file that cannot be
    read or written (OSError), a slide that no longer opens, an image libvips or OpenCV
    cannot decode."""
    import cv2
    import pyvips

    from stainctl.errors import StainctlError

    return OSError, StainctlError, pyvips.Error, cv2.error


def side_by_side_path(thumbnail: Path) -> Path:
    return thumbnail.with_name(thumbnail.stem + ".side-by-side.png")


def _newer_than(path: Path, *sources: Path) -> bool:
    """`path` exists and was written after every one of `sources`."""
    try:
        mtime = path.stat().st_mtime_ns
        return all(mtime >= s.stat().st_mtime_ns for s in sources)
    except FileNotFoundError:
        return False


def densest_field(overview: NDArray[np.uint8], k: int, scale: float, size: tuple[int, int],
                  side: int) -> tuple[int, int]:
    """Top-left (x, y), in output px, of the `side`-px field whose `k`-px window on the
    overview (`scale` output px per overview px) holds the most stain: the sum of 255 - grey
    over stained (saturated) pixels, so glass and pale background count for nothing."""
    import cv2

    grey = cv2.cvtColor(overview, cv2.COLOR_RGB2GRAY).astype(np.float64)
    sat = cv2.cvtColor(overview, cv2.COLOR_RGB2HSV)[..., 1]
    density = np.where(sat > 15, 255.0 - grey, 0.0)
    k = max(1, min(k, *overview.shape[:2]))
    total = cv2.integral(density)
    sums = total[k:, k:] - total[:-k, k:] - total[k:, :-k] + total[:-k, :-k]
    ty, tx = np.unravel_index(int(np.argmax(sums)), sums.shape)
    x = min(max(round(tx * scale), 0), size[0] - side)
    y = min(max(round(ty * scale), 0), size[1] - side)
    return int(x), int(y)


def _rgb(image: pyvips.Image) -> NDArray[np.uint8]:
    if image.bands > 3:
        image = image.extract_band(0, n=3)
    return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8,
                      shape=(image.height, image.width, image.bands))


def _frame(image: NDArray[np.uint8], box: tuple[int, int, int]) -> NDArray[np.uint8]:
    import cv2

    x, y, k = box
    out = np.ascontiguousarray(image).copy()
    cv2.rectangle(out, (x, y), (x + k - 1, y + k - 1), FRAME, 2)
    return out


def _label(image: NDArray[np.uint8], text: str) -> NDArray[np.uint8]:
    import cv2

    out = np.ascontiguousarray(image).copy()
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
    cv2.rectangle(out, (0, 0), (tw + 12, th + base + 10), (255, 255, 255), -1)
    cv2.putText(out, text, (6, th + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                cv2.LINE_AA)
    return out


def _row(images: list[NDArray[np.uint8]]) -> NDArray[np.uint8]:
    h = max(im.shape[0] for im in images)
    gap = np.full((h, GAP, 3), 255, np.uint8)
    parts: list[NDArray[np.uint8]] = []
    for im in images:
        parts.extend([gap] if parts else [])
        parts.append(np.vstack([im, np.full((h - im.shape[0], im.shape[1], 3), 255, np.uint8)]))
    return np.hstack(parts)


def _pad(image: NDArray[np.uint8], width: int) -> NDArray[np.uint8]:
    return np.hstack([image, np.full((image.shape[0], width - image.shape[1], 3), 255,
                                     np.uint8)])
