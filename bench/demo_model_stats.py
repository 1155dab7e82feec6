"""The metrics quoted in the demo-ki67 model card, measured with `stainctl evaluate`.

The card's model was trained with `--hold-out 0.25`: a right-hand strip of each IHC image, one
256-px crop wide, never reached training. This script cuts the same strips again from
../shared/data (the trainer's own `write_held_out`, same fraction and crop), runs the main job on
the CMU-1 sample, and compares two sets against the held-out IHC crops with `evaluate`, 256-px
tiles at 0.5 µm/px:
  * the demo model's virtual Ki67 of CMU-1;
  * CMU-1's own H&E, untranslated: the reference a model has to beat.
Always the DAB stain metrics (colour deconvolution); FID and KID too when the FID Inception
weights file is given (it cannot be downloaded here). Also how much the model changes glass and
tissue: mean absolute change in grey levels over the bright, unstained (glass) pixels and the
other pixels of 576-px CMU-1 windows with 20-80 % glass, as `translate` feeds them.

    python bench/demo_model_stats.py [--inception-weights weights-inception-2015-12-05-6726825d.pth]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "stainctl" / "samples" / "CMU-1-Small-Region.svs"
IHC = [DATA / "tiles" / "ihc" / n for n in
       ("OS-2-ndpi_Ki67.ome.tif", "OS-2-vsi_Ki67.ome.tif", "skimage_ihc_FHL2-DAB_colon.png")]
HOLD_OUT, CROP, MPP = 0.25, 256, 0.5  # as in the card's training command


def glass_and_tissue_change() -> dict[str, float]:
    import numpy as np

    from stainctl.engines.fast.data import load_image
    from stainctl.engines.fast.engine import load_fast_engine
    from stainctl.models.registry import get_card

    he = load_image(SAMPLE, MPP)
    windows = np.stack([he[y:y + 576, x:x + 576] for y in range(0, he.shape[0] - 575, 288)
                        for x in range(0, he.shape[1] - 575, 288)])
    f = windows.astype(np.float32)
    glass = (f.mean(3) > 230) & (f.max(3) - f.min(3) < 13)
    edge = (glass.mean(axis=(1, 2)) > 0.2) & (glass.mean(axis=(1, 2)) < 0.8)
    with tempfile.TemporaryDirectory() as empty:  # the shipped card, not a user's override
        engine = load_fast_engine(get_card("demo-ki67", Path(empty)), Path(empty))
        change = np.abs(engine.translate(windows[edge]).astype(int) - windows[edge]).mean(axis=3)
    return {"windows": int(edge.sum()), "glass": round(float(change[glass[edge]].mean()), 2),
            "tissue": round(float(change[~glass[edge]].mean()), 2)}


def main() -> None:
    from typer.testing import CliRunner

    from stainctl.cli.app import app as cli_app
    from stainctl.engines.fast.data import load_image, write_held_out

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inception-weights", type=Path, help="also measure FID and KID")
    args = ap.parse_args()
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        held_out = Path(tmp) / "held_out"
        write_held_out({p.name.split(".")[0]: load_image(p, MPP, MPP) for p in IHC},
                       HOLD_OUT, CROP, held_out)
        r = runner.invoke(cli_app, ["translate", str(SAMPLE), "--marker", "demo-ki67",
                                    "-o", tmp, "-q"])
        assert r.exit_code == 0, r.output
        fake = Path(tmp) / "CMU-1-Small-Region.demo-ki67.ome.tiff"
        metrics = "stain,fid,kid" if args.inception_weights else "stain"
        command = ["evaluate", "--real", str(held_out), "--fake", str(fake), "--fake", str(SAMPLE),
                   "--tile-size", str(CROP), "--tile-mpp", str(MPP), "--metrics", metrics,
                   "--json"]
        if args.inception_weights:
            command += ["--inception-weights", str(args.inception_weights)]
        r = runner.invoke(cli_app, command)
        assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    print(json.dumps({"held_out_ihc_crops": report["real"]["images"],
                      "sets": {f["label"]: {k: v for k, v in f.items()
                                            if k not in ("best", "worst", "path")}
                               for f in report["fakes"]},
                      "ranking": report["ranking"], "rank_by": report["rank_by"],
                      "caveats": report["caveats"],
                      "mean_change_grey_levels": glass_and_tissue_change()}, indent=2))


if __name__ == "__main__":
    main()
