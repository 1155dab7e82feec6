"""Benchmark: the `evaluate` metric pipeline on CPU, decode vs feature extraction.

Real and fake sets of 1024-px JPEG tiles are made from real images: random crops (with flips and
90-degree turns) of the OS-2 Ki67 IHC crop as "real", and of the same image colour-shifted as
"fake". Two measurements in one run:
  * decode + per-image statistics (DAB stain metrics, badness signs) over the whole sets, with
    the feature network off: images/s, split into decode and statistics seconds;
  * the feature network: the full-size Inception-v3 of FID (torch-fidelity's class, random
    weights: speed does not depend on their values) on a subset of tiles, full tiles plus
    `--seeds` x 4 random 256-px crops each, as `evaluate` runs it by default; images/s and the
    projected time for the whole sets.

    python bench/evaluate.py --tiles 2100 --feature-tiles 24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KI67 = ROOT.parent / "shared" / "data" / "tiles" / "ihc" / "OS-2-ndpi_Ki67.ome.tif"


def make_tiles(folder: Path, source: np.ndarray, n: int, seed: int, shift: tuple[int, ...]) -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    h, w = source.shape[:2]

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        y, x = rng.integers(0, h - 1024), rng.integers(0, w - 1024)
        t = source[y:y + 1024, x:x + 1024]
        t = np.rot90(t[:, ::-1] if rng.integers(2) else t, int(rng.integers(4)))
        t = np.clip(t.astype(np.int16) + np.array(shift, np.int16), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"t{i:05d}.jpg"), np.ascontiguousarray(t[..., ::-1]),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(n)))


def random_inception():
    """torch-fidelity's FID Inception-v3 at full size, random weights, no download."""
    from stainctl.models.torch_compat import prepare_torchvision

    prepare_torchvision()
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    original = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: None
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        return fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=2100)
    ap.add_argument("--feature-tiles", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from stainctl.evaluate.measure import MeasureOptions, measure_set, network_fn
    from stainctl.evaluate.sources import SourceOptions, open_set, read_image

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    source = read_image(KI67)
    t0 = time.perf_counter()
    for name, seed, shift in (("real", 1, (0, 0, 0)), ("fake", 2, (25, -10, 5))):
        if len(list((work / name).glob("*.jpg"))) != args.tiles:
            make_tiles(work / name, source, args.tiles, seed, shift)
    build_s = time.perf_counter() - t0

    result: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "tiles_per_set": args.tiles,
        "tile_px": 1024, "build_s": round(build_s, 1)}

    # 1. Decode + statistics over both whole sets (no network).
    stats_opts = MeasureOptions(full=False, readers=args.readers)
    total = {"decode": 0.0, "stats": 0.0}
    t0 = time.perf_counter()
    for name in ("real", "fake"):
        s = open_set(work / name, SourceOptions(), fake=name == "fake")
        m = measure_set(s.items, stats_opts, None)
        for k in total:
            total[k] += m.seconds[k]
    wall = time.perf_counter() - t0
    n = 2 * args.tiles
    result["decode_and_stats"] = {
        "images": n, "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1),
        "decode_s_per_image": round(total["decode"] / n, 4),
        "stats_s_per_image": round(total["stats"] / n, 4), "readers": args.readers}

    # 2. Inception on a subset: full tiles + seeds x 4 crops, as evaluate's defaults.
    net = network_fn(random_inception(), "cpu")
    s = open_set(work / "real", SourceOptions(), fake=False)
    items = sorted(s.items, key=lambda i: i.key)[:args.feature_tiles]
    opts = MeasureOptions(full=True, crop_seeds=tuple(range(args.seeds)), stain=False,
                          signs=False, readers=args.readers, batch_size=8)
    t0 = time.perf_counter()
    m = measure_set(items, opts, net)
    wall = time.perf_counter() - t0
    forwards = len(items) * (1 + 4 * args.seeds)
    per_tile = wall / len(items)
    result["features"] = {
        "tiles": len(items), "network_inputs": forwards, "wall_s": round(wall, 1),
        "inception_inputs_per_s": round(forwards / m.seconds["features"], 2),
        "tiles_per_s": round(len(items) / wall, 3),
        "projected_full_run_h": round((2 * args.tiles * per_tile
                                       + n / result["decode_and_stats"]["images_per_s"])  # type: ignore[index]
                                      / 3600, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
