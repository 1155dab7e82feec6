"""`train-lora --engine pixcell` on real IHC tiles, with a tiny PixCell of the real classes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pixcell_helpers import install_pixcell
from safetensors.torch import load_file

ARGS = ["--engine", "pixcell", "--marker", "ki67", "--base", "tiny-pixcell", "--batch-size", 2,
        "--warmup", 2, "--lr", 1e-3, "--seed", 3, "--json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ihc_png_path, ki67_ome_paths):
    """An IHC workspace tiled from the real Ki67 crops and scikit-image's IHC image, and a
    2-epoch adapter trained on it."""
    from typer.testing import CliRunner

    from stainctl.cli.app import app

    root = tmp_path_factory.mktemp("lora")
    models = root / "models"
    install_pixcell(models, mpp=0.5)
    ws = root / "ihc-ws"
    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False,
                          env={"STAINCTL_MODELS": str(models), "HF_HUB_OFFLINE": "1"})
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    ihc = [a for p in (*ki67_ome_paths, ihc_png_path) for a in ("--ihc", p)]
    res = cli("train-lora", *ARGS, "-w", ws, *ihc, "--default-mpp", 0.5, "--epochs", 2,
              "--flow", "tiny-pixcell-ki67")
    return cli, models, ws, res


def test_only_the_cross_attention_lora_trains(trained):
    _, models, _, res = trained
    assert res["tiles"] >= 8 and res["epochs"] == 2
    adapter = load_file(res["adapter"])
    assert adapter and all(".attn2." in k for k in adapter)
    assert {k.split(".attn2.")[1].rsplit(".lora_", 1)[0] for k in adapter} == {
        "to_q", "to_k", "to_v", "to_out.0"}
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    assert res["trainable_parameters"] == sum(v.numel() for v in adapter.values())
    history = json.loads((models / "ki67-lora" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (models / "ki67-lora" / "loss.png").stat().st_size > 1000


def test_saved_adapter_reloads_as_the_merged_model(trained):
    from stainctl.engines.pixcell.engine import load_parts
    from stainctl.models.registry import get_card
    from stainctl.models.weights import load_state_dict

    _, models, _, res = trained
    parts = load_parts(get_card("ki67-lora", models), models)
    base = load_state_dict(models / "tiny-pixcell" / "transformer.safetensors")
    adapter = load_file(res["adapter"])
    merged = dict(parts.transformer.named_parameters())
    changed = 0
    for name, value in merged.items():
        module = name.rsplit(".", 1)[0]
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None and name.endswith(".weight"):
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            assert torch.allclose(value, base[name] + b @ a, atol=1e-6), name  # alpha = rank
            changed += 1
        else:
            assert torch.equal(value, base[name]), name  # the base model is untouched
    assert changed == 4 * 2
    assert parts.flow is not None  # --flow: the flow MLP of the named model


@pytest.mark.slow
def test_model_is_usable_at_once_and_a_resumed_run_matches(trained, tmp_path, cmu1_path):
    cli, models, ws, res = trained
    listed = cli("models", "list", "--json")
    assert any(m["name"] == "ki67-lora" and m["installed"] for m in listed["models"])
    out = cli("translate", cmu1_path, "--marker", "ki67-lora", "-o", tmp_path / "out", "--steps", 2,
              "--json")
    assert out["slides"][0]["state"] == "done"

    # One epoch, then the same run asked for two: it resumes after epoch 1 and ends where the
    # uninterrupted two-epoch run ended.
    target = tmp_path / "resumed"
    cli("train-lora", *ARGS, "-w", ws, "--epochs", 1, "-o", target, "--flow",
        "tiny-pixcell-ki67")
    cli("train-lora", *ARGS, "-w", ws, "--epochs", 2, "-o", target, "--flow",
        "tiny-pixcell-ki67")
    whole, resumed = load_file(res["adapter"]), load_file(str(target / "adapter.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)
    assert json.loads((target / "history.json").read_text()) == json.loads(
        (models / "ki67-lora" / "history.json").read_text())
    shutil.rmtree(target)


def test_train_flow_learns_a_flow_from_paired_tiles(trained, tmp_path, cmu1_path, ki67_ome_paths):
    import cv2
    import openslide
    import tiffslide

    from stainctl.engines.pixcell.engine import load_parts
    from stainctl.models.registry import get_card
    from stainctl.models.weights import load_state_dict

    cli, models, ws, _ = trained
    he_dir, ihc_dir = tmp_path / "he", tmp_path / "ihc"
    he_dir.mkdir()
    ihc_dir.mkdir()
    he_slide, ihc_slide = openslide.OpenSlide(cmu1_path), tiffslide.TiffSlide(ki67_ome_paths[0])
    for i in range(4):  # real H&E and Ki67 crops, paired by name (not the same tissue here)
        he = np.asarray(he_slide.read_region((400 + 300 * i, 900), 0, (256, 256)))[..., :3]
        ihc = np.asarray(ihc_slide.read_region((500 + 300 * i, 800), 0, (256, 256)))[..., :3]
        cv2.imwrite(str(he_dir / f"{i:04d}.png"), he[..., ::-1])
        cv2.imwrite(str(ihc_dir / f"{i:04d}.jpg"), ihc[..., ::-1])
    target = tmp_path / "with-flow"
    res = cli("train-lora", *ARGS, "-w", ws, "--epochs", 1, "-o", target, "--name", "ki67-flow",
              "--train-flow", "--paired-he", he_dir, "--paired-ihc", ihc_dir,
              "--flow-epochs", 80)
    history = json.loads((target / "flow-history.json").read_text())
    assert len(history) == 80 and history[-1]["loss"] < 0.6 * history[0]["loss"]
    card = get_card(res["card"], models)
    assert card.weight("flow_mlp").path == "flow_mlp.safetensors"
    parts = load_parts(card, models)
    saved = load_state_dict(target / "flow_mlp.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in parts.flow.state_dict().items())
    # The trained flow carries H&E tokens towards the paired IHC tokens.
    from stainctl.engines.pixcell.flow import translate_tokens

    tiles = lambda d: np.stack([cv2.imread(str(p))[..., ::-1]  # noqa: E731
                                for p in sorted(d.iterdir())])
    he_tok = parts.encoder.encode(tiles(he_dir))
    ihc_tok = parts.encoder.encode(tiles(ihc_dir))
    moved = translate_tokens(parts.flow, he_tok, steps=20)
    assert (moved - ihc_tok).norm() < 0.7 * (he_tok - ihc_tok).norm()


def test_missing_base_weights_stop_it_before_tiling(cli, tmp_path, use_models, ki67_ome_paths):
    models = use_models(lambda d: install_pixcell(d, mpp=0.5))
    (models / "tiny-pixcell" / "vae.safetensors").unlink()
    ws = tmp_path / "ihc-ws"
    r = cli("train-lora", *ARGS, "-w", ws, "--ihc", ki67_ome_paths[0], "--epochs", 1)
    assert r.exit_code == 2
    assert "model tiny-pixcell: its vae weights are missing" in r.stderr
    assert not (ws / "slides").exists()  # nothing was tiled
