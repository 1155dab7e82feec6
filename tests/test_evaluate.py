"""`evaluate`: metrics on real IHC/H&E images, slides and workspaces, and the QC report."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA

from stainctl.errors import UsageError
from stainctl.evaluate.evaluator import EvaluateOptions, evaluate
from stainctl.evaluate.sources import SourceOptions, read_image
from stainctl.evaluate.stain import dab_stats, paired_stain_metrics

RAT = DATA / "paired" / "anhir_rat-kidney"


class TinyFeatures(torch.nn.Module):
    """A small random feature network standing in for Inception (uint8 NCHW in)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x.float() / 127.5 - 1))
        return torch.relu(self.conv2(x)).mean(dim=(2, 3))


def _tiles(image: np.ndarray, size: int, shift: tuple[int, int, int] = (0, 0, 0)):
    h, w = image.shape[:2]
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            t = image[y:y + size, x:x + size].astype(int) + np.array(shift)
            yield f"y{y}_x{x}", np.clip(t, 0, 255).astype(np.uint8)


def _folder(path: Path, tiles) -> Path:
    path.mkdir(parents=True)
    for name, tile in tiles:
        cv2.imwrite(str(path / f"{name}.png"), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def ki67_sets(tmp_path_factory, ki67_ome_paths):
    """Real Ki67 tiles (OS-2 crop), the same tiles, and the same tiles colour-shifted."""
    root = tmp_path_factory.mktemp("sets")
    image = read_image(ki67_ome_paths[0])[:1536, :1536]
    return {name: _folder(root / name, _tiles(image, 256, shift))
            for name, shift in (("real", (0, 0, 0)), ("same", (0, 0, 0)),
                                ("shifted", (40, -20, 0)))}


def test_identical_sets_score_zero_and_a_colour_shift_scores_worse(ki67_sets):
    ev = evaluate(EvaluateOptions(real=ki67_sets["real"],
                                  fakes=(ki67_sets["shifted"], ki67_sets["same"]),
                                  metrics=("fid", "cropfid", "kid", "stain"), seeds=2,
                                  crop_size=128, feature_model=TinyFeatures(), device="cpu"))
    same, shifted = ev.fakes[1].metrics, ev.fakes[0].metrics
    assert ev.real.images == 36 and ev.fakes[1].images == 36
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["cropfid"]["mean"] == pytest.approx(0, abs=1e-6)
    # KID draws different subsets for the two sides: identical sets give ~0 up to that noise.
    assert abs(same["kid"]["mean"]) < 0.02 * shifted["kid"]["mean"]
    assert same["stain"]["pooled_hist_jsd"] == pytest.approx(0, abs=1e-9)
    assert shifted["fid"] > 100 * max(same["fid"], 1e-6)
    assert shifted["cropfid"]["mean"] > 1e-3 and shifted["kid"]["mean"] > 0.01
    assert shifted["stain"]["pooled_hist_jsd"] > 0.01
    assert ev.rank_by == "cropfid" and ev.ranking == ["same", "shifted"]
    # CropFID over seeds: different crops per seed give a spread.
    assert shifted["cropfid"]["n"] == 2 and shifted["cropfid"]["std"] > 0


def test_dab_p90_is_higher_on_ihc_than_on_he(ihc_png_path, cmu1_path):
    ihc = read_image(ihc_png_path)
    from stainctl.slide.reader import open_slide

    slide = open_slide(cmu1_path)
    he = slide.read_region(800, 1200, 0, 512, 512)
    slide.close()
    assert dab_stats(ihc).p90 > 1.5 * dab_stats(he).p90
    assert dab_stats(ihc).positive > dab_stats(he).positive


def test_pearson_of_a_set_with_itself_is_one(ki67_sets):
    stats = [dab_stats(read_image(p)) for p in sorted(ki67_sets["real"].glob("*.png"))]
    m = paired_stain_metrics(stats, stats)
    assert m["p90_pearson_r"] == pytest.approx(1.0)
    assert m["p90_mae"] == 0 and m["hist_kl"] == pytest.approx(0, abs=1e-12)


def test_anhir_pair_registers_on_landmarks(tmp_path):
    # The IHC section is "real"; the H&E section stands in for a virtual IHC of it.
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir()
    fake.mkdir()
    for src, dst in (("Rat-Kidney_PanCytokeratin", real), ("Rat-Kidney_HE", fake)):
        shutil.copy(RAT / f"{src}.jpg", dst / "rat-kidney.jpg")
        shutil.copy(RAT / f"{src}.csv", dst / "rat-kidney.csv")
    common = dict(real=real, fakes=(fake,), metrics=("paired",))
    reg = evaluate(EvaluateOptions(**common)).fakes[0].metrics["paired"]
    raw = evaluate(EvaluateOptions(**common, register=False)).fakes[0].metrics["paired"]
    assert reg["pairs"] == 1 and reg["registered"] == 1 and raw["registered"] == 0
    assert reg["landmark_error_after"] < 0.5 * reg["landmark_error_before"]
    assert reg["per_pair"][0]["landmarks"] >= 60
    # Registration aligns the tissue: the reduced-resolution SSIM improves.
    assert reg["ssim_reduced"] > raw["ssim_reduced"]


@pytest.mark.slow
def test_report_renders_with_all_images(tmp_path, ki67_sets):
    from stainctl.evaluate.report import write_report

    ev = evaluate(EvaluateOptions(real=ki67_sets["real"],
                                  fakes=(ki67_sets["same"], ki67_sets["shifted"]),
                                  metrics=("fid", "stain", "paired"), max_images=12,
                                  feature_model=TinyFeatures(), device="cpu"))
    html = write_report(ev, tmp_path / "report")
    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert data["ranking"] == ["same", "shifted"] and data["real"]["images"] == 12

    class Images(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.srcs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(html.read_text())
    assert {"samples.png", "dab_histograms.png", "best_worst_1.png"} <= set(parser.srcs)
    for src in parser.srcs:
        image = cv2.imread(str(html.parent / src))
        assert image is not None and min(image.shape[:2]) > 100, src
    _check_in_browser(html, len(parser.srcs))


def _check_in_browser(html: Path, count: int) -> None:
    """Load the page in headless Chromium where one is installed and count the images that
    decoded (naturalWidth > 0); without Chromium the parse above is the check."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    probe = html.with_name("probe.html")
    probe.write_text(html.read_text().replace("</body>", """<script>
window.addEventListener('load', () => {
  const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-loaded', ok + '/' + document.images.length);
});</script></body>"""))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={html.parent / 'chrome'}", "--virtual-time-budget=5000",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-loaded="{count}/{count}"' in dom


def test_unreadable_image_is_left_out_and_named(tmp_path, ki67_sets):
    fake = tmp_path / "fake"
    shutil.copytree(ki67_sets["same"], fake)
    (fake / "broken.png").write_bytes(b"not a png")
    ev = evaluate(EvaluateOptions(real=ki67_sets["real"], fakes=(fake,), metrics=("stain",)))
    failed = ev.fakes[0].measures.failed
    assert list(failed) == ["broken"] and "cannot be decoded" in failed["broken"]
    assert ev.fakes[0].images == ev.real.images - 1
    assert "unreadable" in ev.to_json()["fakes"][0]


def test_encoder_metrics_with_a_tiny_uni2h(tmp_path, ki67_sets, monkeypatch):
    from models_helpers import install_tiny

    models = tmp_path / "models"
    install_tiny(models, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ev = evaluate(EvaluateOptions(real=ki67_sets["real"],
                                  fakes=(ki67_sets["same"], ki67_sets["shifted"]),
                                  metrics=("encoder",), encoder="tiny-uni2h", models_dir=models,
                                  max_images=8, device="cpu"))
    same, shifted = (f.metrics["encoder"] for f in ev.fakes)
    assert same["cosine_of_means"] == pytest.approx(1.0, abs=1e-6)
    assert same["frechet"] == pytest.approx(0, abs=1e-6)
    assert shifted["frechet"] > 1e-4 and ev.rank_by == "encoder_fd"


@pytest.fixture(scope="module")
def translated(tmp_path_factory, cmu1_path):
    """The main job on CMU-1 with the shipped demo model: a workspace and a stitched slide."""
    from typer.testing import CliRunner

    from stainctl.cli.app import app

    out = tmp_path_factory.mktemp("main") / "out"
    r = CliRunner().invoke(app, ["translate", str(cmu1_path), "--marker", "demo-ki67", "-o",
                                 str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_stitched_slide_and_workspace_sets(cli, translated, tmp_path, ki67_ome_paths):
    slide = translated / "CMU-1-Small-Region.demo-ki67.ome.tiff"
    r = cli("evaluate", "--real", ki67_ome_paths[0], "--fake", slide, "--fake",
            translated / "workspace", "--marker", "demo-ki67", "--metrics", "stain,seams",
            "--tile-size", "256", "--tile-mpp", "0.5", "--report", tmp_path / "rep", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    by_kind = {f["kind"]: f for f in data["fakes"]}
    # Seams come from the grid stitch writes into the slide: blended borders do not show.
    seams = by_kind["slide"]["seams"]
    assert 0.7 < seams["ratio"] < 1.3, seams
    assert "seams" not in by_kind["workspace"]  # tiles from the store have no stitched borders
    assert by_kind["slide"]["stain"]["p90_fake"] > 0
    assert (tmp_path / "rep" / "slide_1.png").exists()  # H&E | virtual IHC | DAB per slide


def test_the_main_jobs_output_folder_is_its_stitched_slides(cli, translated, ki67_ome_paths):
    """`--fake OUT` (the main job's output folder, as a user evaluates a batch the next
    morning): before, a folder of 5 'images', each whole virtual slide beside its thumbnail, its
    H&E | IHC side-by-side PNG and the workspace's H&E thumbnail and tissue mask, without seams;
    now the stitched slides' tissue tiles, with their seams. Seams asked of a set without
    borders are a caveat, not silence."""
    from stainctl.evaluate.sources import open_set

    fake = open_set(translated, SourceOptions(tile_size=256, tile_mpp=0.5), fake=True)
    assert fake.kind == "slide" and len(fake) > 4
    assert all(i.key.startswith("CMU-1-Small-Region/") for i in fake.items)
    assert any(i.borders and (i.borders[0] or i.borders[1]) for i in fake.items)
    r = cli("evaluate", "--real", ki67_ome_paths[0], "--fake", translated, "--fake",
            translated / "workspace", "--marker", "demo-ki67", "--metrics", "stain,seams",
            "--tile-size", "256", "--tile-mpp", "0.5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    by_kind = {f["kind"]: f for f in data["fakes"]}
    assert "seams" in by_kind["slide"] and "seams" not in by_kind["workspace"]
    assert any(c.startswith(f"seams: {by_kind['workspace']['label']} has no tile borders")
               for c in data["caveats"]), data["caveats"]


def test_a_folder_of_stitched_slides_gives_one_models_slides(translated, tmp_path):
    """WS/outputs, or an OUT used for two markers, holds several models' virtual slides: one
    set would mix them, so --marker chooses, as it does for a workspace."""
    import shutil

    import tifffile

    from stainctl.errors import UsageError
    from stainctl.evaluate.sources import open_set

    [slide] = sorted(translated.glob("*.demo-ki67.ome.tiff"))
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(slide, folder / slide.name)
    other = folder / slide.name.replace("demo-ki67", "other-ki67")
    shutil.copy(slide, other)
    description = str(tifffile.tiffcomment(other)).replace("demo-ki67", "other-ki67")
    tifffile.tiffcomment(other, description.encode())  # UTF-8: the OME XML says "µm"
    options = SourceOptions(tile_size=256, tile_mpp=0.5)
    with pytest.raises(UsageError, match=r"2 models \(demo-ki67, other-ki67\); choose one "
                                         "with --marker"):
        open_set(folder, options, fake=True)
    one = open_set(translated, options, fake=True)
    chosen = open_set(folder, SourceOptions(tile_size=256, tile_mpp=0.5, marker="other-ki67"),
                      fake=True)
    assert chosen.kind == "slide" and len(chosen) == len(one) > 0
    with pytest.raises(UsageError, match=f"holds no her2 virtual slide .*{other.name}"):
        open_set(folder, SourceOptions(tile_size=256, tile_mpp=0.5, marker="her2"), fake=True)


def test_marker_may_be_the_stain_as_translate_takes_it(cli, translated, ki67_ome_paths):
    """`translate --marker ki67` names its outputs after the model (demo-ki67); evaluate
    --marker ki67 refused them: "holds no ki67 virtual slide"."""
    for fake in (translated, translated / "workspace"):
        r = cli("evaluate", "--real", ki67_ome_paths[0], "--fake", fake, "--marker", "ki67",
                "--metrics", "stain", "--tile-size", "256", "--tile-mpp", "0.5", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["fakes"][0]["kind"] in ("slide", "workspace")


def test_seams_the_default_metrics_cannot_measure_are_no_caveat(cli, translated,
                                                                  ki67_ome_paths):
    """Seams are among the default metrics: a workspace's tiles (no stitched borders) left
    them out with a caveat telling the user to give stitched slides, on nearly every run."""
    r = cli("evaluate", "--real", ki67_ome_paths[0], "--fake", translated / "workspace",
            "--marker", "demo-ki67", "--tile-size", "256", "--tile-mpp", "0.5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert "seams" in data["settings"]["metrics"]
    assert not any(c.startswith("seams:") for c in data["caveats"]), data["caveats"]


def test_workspace_real_set_is_the_kept_tiles(translated):
    ws = translated / "workspace"
    from stainctl.evaluate.sources import open_set

    real = open_set(ws, SourceOptions(), fake=False)
    fake = open_set(ws, SourceOptions(marker="demo-ki67"), fake=True)
    assert real.kind == fake.kind == "workspace" and len(real) > 0
    assert set(i.key for i in real.items) <= set(i.key for i in fake.items)
    tile = fake.items[0].load()
    assert tile.shape == (512, 512, 3)  # the store's margins are cropped off
    with pytest.raises(UsageError, match="--marker"):
        open_set(ws, SourceOptions(), fake=True)


def test_missing_inception_weights_is_one_clear_error(cli, tmp_path, monkeypatch, ki67_sets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Asked for by name, a metric that cannot run is an error.
    r = cli("evaluate", "--real", ki67_sets["real"], "--fake", ki67_sets["same"],
            "--metrics", "stain,kid")
    assert r.exit_code == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in r.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_metrics_offline_compute_what_can_run_and_list_the_rest(cli, tmp_path,
                                                                         monkeypatch, ki67_sets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights here
    r = cli("evaluate", "--real", ki67_sets["real"], "--fake", ki67_sets["shifted"], "--json")
    assert r.exit_code == 0, r.output  # was 2: nothing computed
    data = json.loads(r.stdout)
    fake = data["fakes"][0]
    assert fake["stain"]["p90_wasserstein"] > 0 and "fid" not in fake and "kid" not in fake
    assert data["settings"]["metrics"] == ["paired", "seams", "stain"]
    [missing] = data["unavailable"]
    assert missing["metrics"] == ["fid", "cropfid", "kid"]
    assert "weights-inception-2015-12-05-6726825d.pth" in missing["reason"]
    assert "--inception-weights" in missing["reason"]  # the fix

    human = cli("evaluate", "--real", ki67_sets["real"], "--fake", ki67_sets["shifted"],
                "--report", tmp_path / "report")
    assert human.exit_code == 0
    assert "not computed: fid, cropfid, kid: FID/KID need the Inception-v3" in human.stdout
    assert "Not computed: fid, cropfid, kid" in (tmp_path / "report" / "index.html").read_text()
    # A weights file named on the command line asks for FID: a missing one is still an error.
    named = cli("evaluate", "--real", ki67_sets["real"], "--fake", ki67_sets["shifted"],
                "--inception-weights", tmp_path / "nowhere.pth")
    assert named.exit_code == 2 and "nowhere.pth does not exist" in named.stderr


def test_inception_weights_load_from_the_hub_cache_as_tensors(tmp_path, monkeypatch, ihc_png_path):
    """The real loading path with a randomly initialised Inception of the same class."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from stainctl.evaluate import features

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict",
                        lambda self, sd, *a, **k: None)
    state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = tmp_path / "torch" / "hub" / "checkpoints" / features.INCEPTION_FILE
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    assert features.inception_weights(None) == target
    with pytest.raises(UsageError, match="not the FID Inception weights"):
        features.load_inception(target)  # random weights are not the published ones
    model = features.load_inception(target, verify=False)
    feats = features.extract(model, read_image(ihc_png_path)[None, :299, :299])
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    # A pickled object is refused before torch-fidelity would unpickle it.
    evil = tmp_path / "evil.pth"
    torch.save({"conv": Path("x")}, evil)
    with pytest.raises(UsageError, match="plain tensor"):
        features.load_inception(evil, verify=False)


def test_dab_channel_is_scikit_image_rgb2hed(ihc_png_path):
    from skimage.color import rgb2hed

    from stainctl.evaluate.stain import HIST_BINS, HIST_RANGE, dab_channel

    image = read_image(ihc_png_path)
    ref = rgb2hed(image)[..., 2]
    assert np.abs(dab_channel(image) - ref).max() < 1e-6
    hist, _ = np.histogram(np.clip(ref, *HIST_RANGE), bins=HIST_BINS, range=HIST_RANGE)
    assert (dab_stats(image).hist == hist).all()
