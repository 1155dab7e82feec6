"""hs2p's side of bench/tile_filter.py, run by the bench environment's interpreter (hs2p is not a
stainctl dependency): tissue coordinates, then every tile read at full resolution.

    BENCH_PYTHON bench/_hs2p_tiles.py SLIDE WORKERS BACKEND TILE_SIZE MPP

Prints one JSON line: tiles read, seconds for coordinates and for reading.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    path, workers, backend = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    size, mpp = int(sys.argv[4]), float(sys.argv[5])
    t0 = time.perf_counter()
    from hs2p import SegmentationConfig, SlideSpec, TilingConfig, tile_slide
    from hs2p.wsi.reader import open_slide

    result = tile_slide(SlideSpec(sample_id=path.stem, image_path=path),
                        tiling=TilingConfig(requested_spacing_um=mpp, requested_tile_size_px=size,
                                            tolerance=0.05, overlap=0.0, backend=backend),
                        segmentation=SegmentationConfig(method="hsv"), num_workers=workers)
    geometry = result.tiles
    t1 = time.perf_counter()
    reader = open_slide(path, backend=backend)
    locations = list(zip(geometry.x.tolist(), geometry.y.tolist(), strict=True))
    side = (int(geometry.read_tile_size_px), int(geometry.read_tile_size_px))
    n = 0
    if hasattr(reader, "read_regions"):
        for tile in reader.read_regions(locations, int(geometry.read_level), side,
                                        num_workers=workers):
            n += int(tile.shape[0] == side[1])
    else:
        for loc in locations:
            n += int(reader.read_region(loc, int(geometry.read_level), side).shape[0] == side[1])
    t2 = time.perf_counter()
    print(json.dumps({"tiles": n, "coords_s": t1 - t0, "read_s": t2 - t1,
                      "read_level": int(geometry.read_level), "read_size": side[0],
                      "backend": reader.backend_name}))


if __name__ == "__main__":
    main()
