"""The PNG figures of the QC report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.evaluate.sources import Item, SlidePreview
from stainctl.evaluate.stain import HIST_BINS, HIST_RANGE
from stainctl.stain.deconvolution import dab_density

CELL = 192  # px of each tile in a grid figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _small(image: np.ndarray, size: int = CELL) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    s = size / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA)


def _save(fig: Any, path: Path) -> Path:
    from stainctl.workspace.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def tile_grid(rows: Sequence[tuple[str, Sequence[Item | None]]], path: Path,
              titles: Sequence[str] | None = None) -> Path:
    """One row of tiles per labelled set; a missing tile leaves its cell blank."""
    plt = _pyplot()
    ncols = max(len(items) for _, items in rows)
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False,
                             figsize=(1.9 * ncols + 0.5, 1.9 * len(rows) + 0.3))
    for r, (label, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            item = items[c] if c < len(items) else None
            if item is not None:
                try:
                    ax.imshow(_small(item.load()))
                except Exception:  # an unreadable tile shows as a blank cell
                    ax.set_facecolor("#ddd")
            if r == 0 and titles is not None and c < len(titles):
                ax.set_title(titles[c], fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def dab_histograms(real: tuple[str, np.ndarray], fakes: Sequence[tuple[str, np.ndarray]],
                   path: Path) -> Path:
    """Pooled DAB optical-density histograms, normalised, real against each generated set."""
    plt = _pyplot()
    edges = np.linspace(*HIST_RANGE, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (label, hist), style in zip([real, *fakes], ["k-", *(["-"] * len(fakes))], strict=True):
        total = max(float(hist.sum()), 1.0)
        ax.semilogy(centres, np.maximum(hist / total, 1e-7), style, label=label, lw=1.5)
    ax.set_xlabel("DAB optical density (colour deconvolution)")
    ax.set_ylabel("fraction of pixels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def slide_panel(preview: SlidePreview, path: Path, size: int = 640) -> Path:
    """H&E | (virtual) IHC | DAB heat-map thumbnails of one slide."""
    import cv2

    plt = _pyplot()
    ihc = slide_thumbnail(preview.ihc, size)
    panels = [("H&E", slide_thumbnail(preview.he, size) if preview.he else None),
              ("virtual IHC", ihc)]
    dab = dab_density(ihc)
    heat = cv2.applyColorMap(np.clip(dab / HIST_RANGE[1] * 255, 0, 255).astype(np.uint8),
                             cv2.COLORMAP_INFERNO)
    panels.append(("DAB", cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, (title, image) in zip(axes, panels, strict=True):
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
        if image is not None:
            ax.imshow(image)
    fig.suptitle(preview.key, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def slide_thumbnail(path: Path, size: int) -> np.ndarray:
    """The whole slide with its long side at `size` px."""
    from stainctl.slide.reader import open_slide
    from stainctl.slide.thumbnail import read_thumbnail

    slide = open_slide(path)
    if slide.mpp is None:  # the pixel size does not matter for a picture
        slide.close()
        slide = open_slide(path, mpp=1.0)
    try:
        mpp = slide.require_mpp()
        w0, h0 = slide.dimensions
        return read_thumbnail(slide, max(mpp, max(w0, h0) * mpp / size))
    finally:
        slide.close()
