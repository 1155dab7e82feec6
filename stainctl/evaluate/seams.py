"""How visible the tile borders of a stitched image are.

The mean absolute grey-level step across the lines where tiles meet, against the mean step across
every other line of pixels. Tissue has the same texture at a border as anywhere else, so a seam-free
stitch scores about 1; a brightness jump or a misaligned edge at the borders raises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeamScore:
    border: float  # mean |step| across tile borders
    interior: float  # mean |step| across all other pixel lines
    lines: int  # border lines measured

    @property
    def ratio(self) -> float:
        """border / interior: about 1 when no seam shows."""
        return self.border / max(self.interior, 1e-9)


def seam_score(image: np.ndarray, xs: Sequence[int], ys: Sequence[int]) -> SeamScore:
    """`image`: (H, W) grey or (H, W, C); `xs`/`ys`: first column/row of each tile after a
    border (the step measured is between pixel x-1 and x)."""
    border_sum, border_n, inside_sum, inside_n = seam_sums(image, xs, ys)
    return SeamScore(border_sum / max(border_n, 1), inside_sum / max(inside_n, 1),
                     len({x for x in xs if 0 < x < image.shape[1]})
                     + len({y for y in ys if 0 < y < image.shape[0]}))


def seam_sums(image: np.ndarray, xs: Sequence[int],
              ys: Sequence[int]) -> tuple[float, int, float, int]:
    """Sums and counts of the border and interior steps, to pool over many tiles of a slide."""
    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    h, w = grey.shape
    dx = np.abs(np.diff(grey, axis=1))  # dx[:, i]: step between columns i and i+1
    dy = np.abs(np.diff(grey, axis=0))
    bx = np.zeros(w - 1, bool)
    by = np.zeros(h - 1, bool)
    bx[[x - 1 for x in xs if 0 < x < w]] = True
    by[[y - 1 for y in ys if 0 < y < h]] = True
    return (float(dx[:, bx].sum() + dy[by].sum()), int(dx[:, bx].size + dy[by].size),
            float(dx[:, ~bx].sum() + dy[~by].sum()), int(dx[:, ~bx].size + dy[~by].size))
