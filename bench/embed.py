"""Benchmark: `embed`'s pipeline against the pure network forward, UNI2-h architecture.

The UNI2-h network at its real size with random weights (no download), on the CPU or a GPU. In
this one script:
  * pure forward: crops already resized, normalised and on the device; only the network runs;
  * pipeline: what `stainctl embed` runs per slide (`embed_to_files`): 256-px tiles (one crop
    each) read from the real CMU-1 sample with OpenSlide on reader threads, cropped, resized and
    normalised, the network, float16 copies back and the on-disk array written.
Both time the same number of crops after one warm-up batch. Target (issue 4): the pipeline at
>= 85 % of the pure forward rate.

    python bench/embed.py --device cpu --batch 8 --dtype bf16 --batches 4
    python bench/embed.py --device cuda --batch 64 --dtype bf16 --batches 20 --readers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the GPU machine)
SAMPLE = ROOT / "stainctl" / "samples" / "CMU-1-Small-Region.svs"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8, help="crops (= 256-px tiles) per batch")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per side")
    ap.add_argument("--readers", type=int, default=2)
    args = ap.parse_args()

    import torch

    from stainctl.models.card import load_card
    from stainctl.models.encoders import EncoderSpec, TileEncoder, build_network
    from stainctl.models.registry import SHIPPED
    from stainctl.slide.reader import open_slide
    from stainctl.steps.embed import EmbedJob, embed_to_files

    card = load_card(SHIPPED / "uni2-h.toml")
    spec = EncoderSpec.from_card(card)
    torch.manual_seed(0)
    encoder = TileEncoder(card.name, spec, build_network(spec), card.input_mpp, args.device,
                          args.dtype)
    params = sum(p.numel() for p in encoder.network.parameters())

    # Pure forward on preloaded crops.
    crops = torch.randn(args.batch, 3, spec.input_size, spec.input_size, device=args.device)

    def forward() -> None:
        with torch.inference_mode(), encoder._autocast():
            encoder.network(crops)

    forward()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        forward()
    sync(args.device)
    pure = args.batch * args.batches / (time.perf_counter() - t0)

    # The embed pipeline over real tiles of the sample (cycled to get enough of them).
    slide = open_slide(SAMPLE)
    w, h = slide.dimensions
    extent0 = 256 * 0.5 / slide.mpp
    step = int(extent0)
    coords = [(x, y) for y in range(0, h - step, step) for x in range(0, w - step, step)]
    n = args.batch * (args.batches + 1)
    tiles = np.array([(i, *coords[i % len(coords)]) for i in range(n)], np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        def job(rows: np.ndarray) -> EmbedJob:
            return EmbedJob(0, "bench", str(SAMPLE), extent0, 256, rows, tmp, "uni2-h",
                            "uni2-h", tmp, args.device, args.dtype, args.batch, args.readers)

        embed_to_files(job(tiles[:args.batch]), encoder, lambda k: None)  # warm-up
        t0 = time.perf_counter()
        embed_to_files(job(tiles[args.batch:]), encoder, lambda k: None)
        pipeline = args.batch * args.batches / (time.perf_counter() - t0)

    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    print(json.dumps({
        "network": f"uni2-h architecture, {params / 1e6:.1f} M parameters, random weights",
        "device": device_name, "cores": os.cpu_count(), "torch": torch.__version__,
        "dtype": args.dtype, "batch_crops": args.batch, "timed_crops": args.batch * args.batches,
        "readers": args.readers,
        "pure_forward_crops_per_s": round(pure, 2), "pipeline_crops_per_s": round(pipeline, 2),
        "pipeline_over_pure": round(pipeline / pure, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
