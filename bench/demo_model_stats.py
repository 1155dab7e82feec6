"""The DAB statistics quoted in the demo-ki67 model card, measured.

Colour deconvolution (scikit-image's rgb2hed) of (a) the demo model's output on the tissue tiles
of the CMU-1 sample and (b) the real Ki67 IHC crops it was trained against, both at 0.5 µm/px:
the mean DAB optical density over tissue pixels, the fraction of tissue pixels with DAB > 0.15
(clearly brown), and the mean of the per-image top-10 % DAB (UNIStainNet's intensity measure).
The Ki67 crops were training images: these numbers say whether the model learned the stain's
colour statistics, not how it generalises (no held-out IHC exists in ../shared/data).

    python bench/demo_model_stats.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def dab_stats(images: list[np.ndarray]) -> dict[str, float]:
    from skimage.color import rgb2hed

    dab, top = [], []
    for im in images:
        tissue = im.mean(axis=2) < 220
        if tissue.sum() < 100:
            continue
        d = rgb2hed(im)[..., 2][tissue]
        dab.append(d)
        top.append(float(np.mean(np.sort(d)[-max(1, len(d) // 10):])))
    allv = np.concatenate(dab)
    return {"mean_dab_od": round(float(allv.mean()), 4),
            "brown_fraction": round(float((allv > 0.15).mean()), 4),
            "top10_dab_mean": round(float(np.mean(top)), 4), "images": len(top)}


def main() -> None:
    import tiffslide
    from typer.testing import CliRunner

    from stainctl.cli.app import app as cli_app
    from stainctl.engines.fast.train import load_image

    with tempfile.TemporaryDirectory() as tmp:
        r = CliRunner().invoke(cli_app, ["translate", str(ROOT / "stainctl" / "samples" /
                                                          "CMU-1-Small-Region.svs"),
                                         "--marker", "demo-ki67", "-o", tmp, "-q"])
        assert r.exit_code == 0, r.output
        out = tiffslide.TiffSlide(Path(tmp) / "CMU-1-Small-Region.demo-ki67.ome.tiff")
        full = np.asarray(out.read_region((0, 0), 0, out.dimensions).convert("RGB"))
    generated = [full[y:y + 512, x:x + 512] for y in range(0, full.shape[0] - 511, 512)
                 for x in range(0, full.shape[1] - 511, 512)]
    ihc = [load_image(DATA / "tiles" / "ihc" / name, 0.5)
           for name in ("OS-2-ndpi_Ki67.ome.tif", "OS-2-vsi_Ki67.ome.tif")]
    real = [im[y:y + 512, x:x + 512] for im in ihc
            for y in range(0, im.shape[0] - 511, 512) for x in range(0, im.shape[1] - 511, 512)]
    he = load_image(ROOT / "stainctl" / "samples" / "CMU-1-Small-Region.svs", 0.5)
    source = [he[y:y + 512, x:x + 512] for y in range(0, he.shape[0] - 511, 512)
              for x in range(0, he.shape[1] - 511, 512)]
    print(json.dumps({"generated_from_cmu1": dab_stats(generated),
                      "real_ki67_crops": dab_stats(real),
                      "input_he_cmu1": dab_stats(source)}, indent=2))


if __name__ == "__main__":
    main()
