"""Paired metrics of one generated set: find the pairs, register them, compare them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import UsageError
from stainctl.evaluate.paired import compare, pairs_from_csv
from stainctl.evaluate.sources import Item
from stainctl.evaluate.stain import dab_stats, paired_stain_metrics
from stainctl.slide.registration import (
    landmarks_beside,
    read_landmarks,
    register_landmarks,
    warp_onto,
)

MAX_LISTED = 200  # pairs listed one by one in metrics.json


def find_pairs(real: list[Item], fake: list[Item],
               csv_path: Path | None) -> list[tuple[Item, Item]]:
    """Pairs from a `real,fake` CSV (entries are keys or file paths), else the keys both sets
    share."""
    if csv_path is None:
        by_key = {i.key: i for i in fake}
        return [(r, by_key[r.key]) for r in real if r.key in by_key]

    def index(items: list[Item]) -> dict[str, Item]:
        out = {i.key: i for i in items}
        out.update({str(i.path.resolve()): i for i in items if i.path is not None})
        return out

    ri, fi = index(real), index(fake)
    pairs = []
    for a, b in pairs_from_csv(csv_path):
        ra = ri.get(a) or ri.get(str((csv_path.parent / a).resolve()))
        fb = fi.get(b) or fi.get(str((csv_path.parent / b).resolve()))
        if ra is None or fb is None:
            missing, side = (a, "real") if ra is None else (b, "fake")
            raise UsageError(f"{csv_path}: {missing} is not in the {side} set (give keys as "
                             "evaluate lists them, or image paths)")
        pairs.append((ra, fb))
    return pairs


def paired_metrics(real: Any, fake: Any, options: Any) -> dict[str, Any] | None:
    """SSIM/PSNR (full and reduced resolution), paired DAB agreement, and landmark errors where
    the pair was registered; None when the sets have no pairs."""
    pairs = find_pairs(real.image_set.items, fake.image_set.items, options.pairs_csv)
    if options.max_images is not None:
        pairs = pairs[:options.max_images]
    if not pairs:
        return None
    rows, dab_r, dab_f, regs = [], [], [], []
    for r_item, f_item in pairs:
        a, b = r_item.load(), f_item.load()
        row: dict[str, Any] = {"real": r_item.key, "fake": f_item.key}
        mask = None
        reg = _registration(r_item, f_item, a.shape[:2]) if options.register else None
        if reg is not None:
            b, mask = warp_onto(b, reg.matrix, a.shape[:2])
            regs.append(reg)
            row.update({"landmarks": reg.landmarks, "landmark_error_before": reg.error_before,
                        "landmark_error_after": reg.error_after})
        row.update(compare(a, b, mask))
        rows.append(row)
        dab_r.append(dab_stats(a, options.dab_threshold))
        dab_f.append(dab_stats(b, options.dab_threshold))
    keys = ("ssim_full", "psnr_full", "ssim_reduced", "psnr_reduced")
    out: dict[str, Any] = {"pairs": len(rows), "registered": len(regs)}
    for k in keys:
        vals = np.array([row[k] for row in rows], dtype=np.float64)
        out[k] = float(np.mean(vals[np.isfinite(vals)])) if np.isfinite(vals).any() \
            else float("nan")
    if regs:
        out["landmark_error_before"] = float(np.mean([g.error_before for g in regs]))
        out["landmark_error_after"] = float(np.mean([g.error_after for g in regs]))
        out["landmark_rtre_after"] = float(np.mean([g.error_after / g.diagonal for g in regs]))
    out["stain"] = paired_stain_metrics(dab_r, dab_f)
    out["per_pair"] = rows[:MAX_LISTED]
    return out


def _registration(r_item: Item, f_item: Item, shape: tuple[int, int]) -> Any:
    if r_item.path is None or f_item.path is None:
        return None
    lr, lf = landmarks_beside(r_item.path), landmarks_beside(f_item.path)
    if lr is None or lf is None:
        return None
    return register_landmarks(read_landmarks(lr), read_landmarks(lf), shape)
