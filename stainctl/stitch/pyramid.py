"""The options of a pyramidal TIFF output; saving a (streamed) image as one with libvips (what
`--level0` resamples and writes; stitch's own canvas goes through `tiffwriter`), and the thumbnail.

OME-TIFF keeps the reduced levels in SubIFDs (tiffslide, QuPath, Bio-Formats read them; OpenSlide
sees level 0 only); plain TIFF keeps them as pages, which OpenSlide reads (docs/NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("ome-tiff", "tiff")
COMPRESSIONS = ("jpeg", "lzw", "deflate", "none")


@dataclass(frozen=True)
class PyramidOptions:
    format: str = "ome-tiff"
    compression: str = "jpeg"
    quality: int = 90  # JPEG; libvips writes Q >= 90 without chroma subsampling (docs/NOTES.md)
    tile: int = 512

    def __post_init__(self) -> None:
        from stainctl.errors import UsageError

        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {self.format}")
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, "
                             f"got {self.compression}")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be in 1..100, got {self.quality}")
        if self.tile < 16 or self.tile % 16:
            raise UsageError(f"--tile must be a multiple of 16, got {self.tile}")

    @property
    def suffix(self) -> str:
        return ".ome.tiff" if self.format == "ome-tiff" else ".tif"

    def thumbnail(self, output: Path) -> Path:
        """The PNG written beside `output` (whatever TIFF suffix it was given)."""
        name = output.name
        for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
            if name.lower().endswith(suffix):
                name = name[:-len(suffix)]
                break
        return output.with_name(name + ".png")


def save_pyramid(image: Any, path: Path, mpp: float, description: str,
                 options: PyramidOptions) -> None:
    """Write `image` (a pyvips image, possibly streaming) to `path` with resolution tags for
    `mpp` µm/px and `description` as the ImageDescription of the first IFD."""
    import pyvips

    image = image.copy()
    # Drop metadata the input carried so it cannot leak into the output (an inherited Aperio
    # description makes OpenSlide read the wrong mpp, docs/NOTES.md).
    for field in image.get_fields():
        if field in ("image-description", "xmp-data", "exif-data", "ipct-data"):
            image.remove(field)
    image.set_type(pyvips.GValue.gstr_type, "image-description", description)
    per_mm = 1000.0 / mpp  # libvips takes pixels per millimetre
    image.tiffsave(
        str(path), tile=True, tile_width=options.tile, tile_height=options.tile, pyramid=True,
        subifd=options.format == "ome-tiff", bigtiff=True, compression=options.compression,
        Q=options.quality, xres=per_mm, yres=per_mm, resunit="cm")


def save_thumbnail(slide: Path, png: Path, size: int = 1024) -> None:
    """A PNG of at most `size` px a side, from the smallest pyramid level that is big enough."""
    import pyvips

    thumb = pyvips.Image.thumbnail(str(slide), size, size="down")  # never enlarged
    thumb.pngsave(str(png))
