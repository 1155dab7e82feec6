"""Nuclei by size on readout's working grid (1 µm/px) against the tile's own 0.5 µm/px.

Each OS-2 Ki67 crop (../shared/data, two scanners) is resized to 0.5 µm/px and cut into 576-px
readout tiles; `detect_nuclei` runs at `grid_mpp` 1.0 and 0.5 and the nucleus areas are binned
in µm² (lymphocytes, 5-7 µm across, are 20-40 µm²). Prints a table; bench/RESULTS.md, readout.

    python bench/nuclei_sizes.py
"""

from __future__ import annotations

import itertools
import sys

import cv2
import numpy as np
import tifffile
from _common import ROOT

sys.path.insert(0, str(ROOT))
from stainctl.readout.nuclei import NucleiParams, detect_nuclei

CROPS = (("NDPI", "OS-2-ndpi_Ki67.ome.tif", 0.2271), ("VSI", "OS-2-vsi_Ki67.ome.tif", 0.3460))
BINS = [20, 30, 40, 60, 100, 200, 400]


def main() -> None:
    print("| crop, grid | nuclei | index | " + " | ".join(
        f"{a}-{b}" for a, b in itertools.pairwise(BINS)) + " |")
    for label, name, mpp in CROPS:
        rgb = tifffile.imread(ROOT.parent / "shared" / "data" / "tiles" / "ihc" / name)[..., :3]
        h, w = rgb.shape[:2]
        img = cv2.resize(np.ascontiguousarray(rgb), (round(w * mpp / 0.5), round(h * mpp / 0.5)),
                         interpolation=cv2.INTER_AREA)
        for grid in (1.0, 0.5):
            found = [detect_nuclei(img[y:y + 576, x:x + 576], 0.5, NucleiParams(grid_mpp=grid))
                     for y in range(0, img.shape[0] - 575, 576)
                     for x in range(0, img.shape[1] - 575, 576)]
            areas = np.concatenate([n.area_um2 for n in found])
            positive = np.concatenate([n.positive for n in found])
            hist = np.histogram(areas, bins=BINS)[0]
            print(f"| {label}, {grid} µm/px | {len(areas)} | {100 * positive.mean():.1f} % | "
                  + " | ".join(str(v) for v in hist) + " |")


if __name__ == "__main__":
    main()
