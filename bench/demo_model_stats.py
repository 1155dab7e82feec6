"""The metrics quoted in the demo-ki67 model card (issue 22's "Done when"), measured.

The card's model was trained with `--hold-out 0.25`: a right-hand strip of each Ki67 IHC image,
one 256-px crop wide, never reached training. This script cuts the same strips again from
../shared/data (the trainer's own `write_held_out`, same fraction and crop), runs the main job on
the CMU-1 sample with the model, and measures, against the held-out Ki67 crops:
  * DAB-positive area (OD > 0.15) and per-image p90 DAB (mean of the top decile) over EVERY
    256-px tile at 0.5 µm/px of the model's virtual Ki67 of CMU-1 (the main job's output) where
    the H&E is tissue (the trainer's rule, by which the held-out crops were cut: 33 tiles), and
    of CMU-1's own H&E untranslated (the reference a model has to beat), against EVERY held-out
    crop, with `stainctl.evaluate.dab_tiles` (the per-image statistics of `evaluate --metrics
    stain`; each mean, and the output/real ratio, with a percentile bootstrap 95 % interval over
    tiles); target: output within 1.5x of the real IHC. (`evaluate --metrics stain` itself
    samples as many output tiles as there are real crops, 4 or 5 of ~22: its figures, kept in
    the JSON under "evaluate", move more with that sample than with training.)
  * the haematoxylin density of DAB-negative tissue (tissue: mean RGB < 220; DAB <= 0.15),
    pooled over the same tiles of the output and over the held-out crops, with its interval
    over tiles; target: within 25 %;
  * the Ki67 nuclear positivity index of `stainctl readout --marker ki67` (positive nuclei over
    nuclei) on the output slide, on the held-out crops and on the H&E input;
  * how much the model changes glass and tissue: mean absolute change in grey levels over the
    bright, unstained (glass) pixels and the other pixels of 576-px CMU-1 windows with 20-80 %
    glass, as `translate` feeds them (target: glass within 2 grey levels).
It prints the JSON, then the lines for the card. FID and KID too when the FID Inception weights
file is given (it cannot be downloaded here).

`--against validation` measures against the validation crops instead (`--validation 0.25`: a
bottom strip of what the hold-out left, `validation_split`): choose checkpoints and recipes on
those, and measure the held-out crops once, for the model chosen.

    python bench/demo_model_stats.py [--model NAME --models-dir DIR]
        [--against held-out|validation]
        [--inception-weights weights-inception-2015-12-05-6726825d.pth]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "stainctl" / "samples" / "CMU-1-Small-Region.svs"
# The Ki67 targets only: the FHL2 image (cytoplasmic DAB) is not a Ki67 reference.
IHC = [DATA / "tiles" / "ihc" / n for n in ("OS-2-ndpi_Ki67.ome.tif", "OS-2-vsi_Ki67.ome.tif")]
HOLD_OUT, VALIDATION, CROP, MPP = 0.25, 0.25, 256, 0.5  # as in the card's training command
TISSUE_BELOW, DAB_POSITIVE = 220.0, 0.15


def load_model(name: str, models_dir: Path | None) -> Any:
    from stainctl.engines.fast.engine import load_fast_engine
    from stainctl.models.registry import get_card

    if models_dir is None:
        with tempfile.TemporaryDirectory() as empty:  # the shipped card, not a user's override
            return load_fast_engine(get_card(name, Path(empty)), Path(empty))
    return load_fast_engine(get_card(name, models_dir), models_dir)


def glass_and_tissue_change(engine: Any) -> dict[str, float]:
    from stainctl.engines.fast.data import load_image

    he = load_image(SAMPLE, MPP)
    windows = np.stack([he[y:y + 576, x:x + 576] for y in range(0, he.shape[0] - 575, 288)
                        for x in range(0, he.shape[1] - 575, 288)])
    f = windows.astype(np.float32)
    glass = (f.mean(3) > 230) & (f.max(3) - f.min(3) < 13)
    edge = (glass.mean(axis=(1, 2)) > 0.2) & (glass.mean(axis=(1, 2)) < 0.8)
    change = np.abs(engine.translate(windows[edge]).astype(int) - windows[edge]).mean(axis=3)
    return {"windows": int(edge.sum()), "glass": round(float(change[glass[edge]].mean()), 2),
            "tissue": round(float(change[~glass[edge]].mean()), 2)}


def tissue_tiles(he: np.ndarray, image: np.ndarray | None = None) -> list[np.ndarray]:
    """Every non-overlapping CROP-px tile of `image` (default: `he` itself) where the H&E `he`
    is mostly tissue (the trainer's rule, by which the held-out crops were cut). The H&E, not the
    output, says where tissue is: a model that browns more would otherwise make more tiles
    count, and two models would be measured on different tiles."""
    from stainctl.engines.fast.data import tissue_origins

    image = he if image is None else image
    if image.shape[:2] != he.shape[:2]:
        raise ValueError(f"output {image.shape[:2]} and H&E {he.shape[:2]} differ in size")
    return [image[y:y + CROP, x:x + CROP] for y, x in tissue_origins(he, CROP)]


def counterstain(tiles: list[np.ndarray]) -> dict[str, Any]:
    """Haematoxylin of DAB-negative tissue, pooled over the tiles (with its bootstrap interval
    over tiles), and the mean RGB of those pixels."""
    from skimage.color import rgb2hed

    from stainctl.evaluate.bootstrap import bootstrap_pooled

    h_sums, counts, rgb_sum = [], [], np.zeros(3)
    for t in tiles:
        hed = rgb2hed(t)
        mask = (t.mean(axis=2) < TISSUE_BELOW) & (hed[..., 2] <= DAB_POSITIVE)
        h_sums.append(float(np.maximum(hed[..., 0], 0)[mask].sum()))
        counts.append(int(mask.sum()))
        rgb_sum += t[mask].sum(axis=0)
    h = bootstrap_pooled(h_sums, counts)
    return {"haematoxylin": h.value, "haematoxylin_ci95": [round(h.low, 4), round(h.high, 4)],
            "rgb": [round(float(v), 1) for v in rgb_sum / max(sum(counts), 1)]}


def readout_index(runner: Any, app: Any, path: Path, out: Path,
                  mpp: float | None = None) -> dict[str, float]:
    """`stainctl readout PATH --marker ki67`: positive nuclei / nuclei, summed over its slides
    (a folder of crops: every crop)."""
    command = ["readout", str(path), "--marker", "ki67", "-o", str(out), "--json"]
    if mpp is not None:
        command += ["--mpp", str(mpp)]
    r = runner.invoke(app, command)
    assert r.exit_code == 0, r.output
    details = [s["details"] for s in json.loads(r.stdout)["slides"]]
    count = sum(int(d["nuclei"]) for d in details)
    positive = sum(int(d["positive_nuclei"]) for d in details)
    return {"nuclei": count, "positive": positive,
            "index": positive / count if count else float("nan")}


def card_lines(m: dict[str, Any], against: str = "held-out") -> list[str]:
    real, fake, he = m["held_out_ihc"], m["output"], m["he_input"]

    def ci(e: dict[str, Any], scale: float = 1, fmt: str = ".1f") -> str:
        lo, hi = (scale * v for v in e["ci95"])
        return f"{scale * e['value']:{fmt}} (95 % CI {lo:{fmt}}-{hi:{fmt}})"

    def ratio(e: dict[str, Any]) -> str:
        return f"{e['value']:.2f}x, 95 % CI {e['ci95'][0]:.2f}-{e['ci95'][1]:.2f}x"

    h_change = 100 * (fake["haematoxylin"] / real["haematoxylin"] - 1)
    return [
        f"DAB-positive area (OD > 0.15), every tile: {ci(fake['dab_positive'], 100)} % in "
        f"its output on CMU-1 ({fake['tiles']} tiles) against {ci(real['dab_positive'], 100)} % "
        f"in the {against} Ki67 IHC ({real['tiles']} crops) ({ratio(m['ratio']['dab_positive'])};"
        f" H&E input {100 * he['dab_positive']['value']:.1f} %);",
        f"per-image p90 DAB {ci(fake['dab_p90'], 1, '.3f')} against "
        f"{ci(real['dab_p90'], 1, '.3f')} ({ratio(m['ratio']['dab_p90'])}; "
        f"H&E {he['dab_p90']['value']:.3f});",
        f"haematoxylin of DAB-negative tissue {ci_h(fake)} against {ci_h(real)} "
        f"({h_change:+.0f} %; H&E {he['haematoxylin']:.3f}); "
        f"mean RGB there {fake['rgb']} against {real['rgb']};",
        "Ki67 nuclear positivity index (`stainctl readout --marker ki67`): "
        f"{100 * fake['ki67_index']:.1f} % of {fake['nuclei']} nuclei in its output on CMU-1 "
        f"against {100 * real['ki67_index']:.1f} % of {real['nuclei']} in the {against} real "
        f"crops (H&E input {100 * he['ki67_index']:.1f} %);",
        f"glass left as glass: mean change {m['change']['glass']:.1f} grey levels on glass, "
        f"{m['change']['tissue']:.0f} on tissue.",
    ]


def ci_h(s: dict[str, Any]) -> str:
    lo, hi = s["haematoxylin_ci95"]
    return f"{s['haematoxylin']:.3f} (95 % CI {lo:.3f}-{hi:.3f})"


def main() -> None:
    import cv2
    from typer.testing import CliRunner

    from stainctl.cli.app import app as cli_app
    from stainctl.engines.fast.data import load_image, validation_split, write_held_out
    from stainctl.evaluate.dab_tiles import compare_dab

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo-ki67", help="the model to measure")
    ap.add_argument("--models-dir", type=Path,
                    help="where --model is installed (default: the shipped card only)")
    ap.add_argument("--against", choices=("held-out", "validation"), default="held-out",
                    help="the real crops: held-out (report once) or validation (to choose on)")
    ap.add_argument("--inception-weights", type=Path, help="also measure FID and KID")
    args = ap.parse_args()
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models_dir or Path(tmp) / "no-models"
        held_out = Path(tmp) / "held_out"
        ihc = {p.name.split(".")[0]: load_image(p, MPP, MPP) for p in IHC}
        if args.against == "validation":  # the same split as the trainer's, less its hold-out
            write_held_out(write_held_out(ihc, HOLD_OUT, CROP, Path(tmp) / "unused"),
                           VALIDATION, CROP, held_out, split=validation_split)
        else:
            write_held_out(ihc, HOLD_OUT, CROP, held_out)
        r = runner.invoke(cli_app, ["translate", str(SAMPLE), "--marker", args.model,
                                    "--models-dir", str(models), "-o", tmp, "-q"])
        assert r.exit_code == 0, r.output
        fake = Path(tmp) / f"CMU-1-Small-Region.{args.model}.ome.tiff"
        metrics = "stain,fid,kid" if args.inception_weights else "stain"
        command = ["evaluate", "--real", str(held_out), "--fake", str(fake), "--fake", str(SAMPLE),
                   "--tile-size", str(CROP), "--tile-mpp", str(MPP), "--metrics", metrics,
                   "--json"]
        if args.inception_weights:
            command += ["--inception-weights", str(args.inception_weights)]
        r = runner.invoke(cli_app, command)
        assert r.exit_code == 0, r.output
        real_tiles = [cv2.imread(str(p))[..., ::-1].copy() for p in sorted(held_out.glob("*.png"))]
        he_image = load_image(SAMPLE, MPP)
        sets = {"held_out_ihc": real_tiles,
                "output": tissue_tiles(he_image, load_image(fake, MPP)),
                "he_input": tissue_tiles(he_image)}
        index = {"held_out_ihc": readout_index(runner, cli_app, held_out, Path(tmp) / "r1", MPP),
                 "output": readout_index(runner, cli_app, fake, Path(tmp) / "r2"),
                 "he_input": readout_index(runner, cli_app, SAMPLE, Path(tmp) / "r3")}
    report = json.loads(r.stdout)
    dab = {"output": compare_dab(sets["held_out_ihc"], sets["output"]),
           "he_input": compare_dab(sets["held_out_ihc"], sets["he_input"])}
    dab_of = {"held_out_ihc": dab["output"].real, "output": dab["output"].fake,
              "he_input": dab["he_input"].fake}
    measured: dict[str, Any] = {}
    for key, tiles in sets.items():
        c, k = counterstain(tiles), index[key]
        measured[key] = {"tiles": len(tiles), **dab_of[key].as_dict(),
                         "haematoxylin": round(c["haematoxylin"], 4),
                         "haematoxylin_ci95": c["haematoxylin_ci95"], "rgb": c["rgb"],
                         "nuclei": k["nuclei"], "ki67_index": round(k["index"], 4)}
    measured["ratio"] = {"dab_positive": dab["output"].positive_ratio.as_dict(3),
                         "dab_p90": dab["output"].p90_ratio.as_dict(3)}
    measured["change"] = glass_and_tissue_change(load_model(args.model, args.models_dir))
    print(json.dumps({"model": args.model, "against": args.against,
                      "held_out_ihc_crops": len(real_tiles),
                      **measured, "ranking": report["ranking"], "rank_by": report["rank_by"],
                      "caveats": report["caveats"],
                      "evaluate": {f["label"]: {k: v for k, v in f.items()
                                                if k not in ("best", "worst", "path")}
                                   for f in report["fakes"]}}, indent=2))
    print("\n".join(card_lines(measured, args.against)))


if __name__ == "__main__":
    main()
