"""`train-lora --engine fast`: LoRA adaptation of the shipped demo model on real IHC images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stainctl.engines.fast.adapt import AdaptOptions
from stainctl.engines.fast.engine import load_fast_engine, load_generator
from stainctl.models.lora import LoraSpec, adapter_state, attach, load_adapted
from stainctl.models.registry import get_card
from stainctl.steps.train import adapt_fast as adapt


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, he_ome_path, ki67_ome_paths):
    models = tmp_path_factory.mktemp("models")
    options = AdaptOptions(name="ki67-site2", marker="ki67", base="demo-ki67", he=(he_ome_path,),
                           ihc=(ki67_ome_paths[1],), out=models / "ki67-site2", models_dir=models,
                           lora=LoraSpec(rank=4, alpha=4), steps=4, batch_size=2, crop=128,
                           lr=1e-2)
    return options, adapt(options, log=False)


def test_only_adapter_weights_change(adapted):
    options, res = adapted
    base = load_generator(get_card("demo-ki67"), options.models_dir)
    model = attach(load_generator(get_card("demo-ki67"), options.models_dir), LoraSpec())
    saved = load_file(str(res.adapter))
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, saved)
    base_state = base.state_dict()
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, base_state[key]), name  # the base model is untouched
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert 0 < res.trainable < 0.05 * res.frozen
    assert set(adapter_state(model)) == set(saved)


def test_saved_adapter_reloads_to_the_same_model(adapted):
    options, res = adapted
    card = get_card(str(res.card), options.models_dir)
    engine = load_fast_engine(card, options.models_dir)
    manual = load_adapted(load_generator(get_card("demo-ki67"), options.models_dir), res.adapter)
    tiles = np.random.default_rng(0).integers(0, 255, (1, 128, 128, 3), dtype=np.uint8)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        ref = manual(x, torch.zeros(1, dtype=torch.long))
    ref_u8 = ((ref + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(engine.translate(tiles), ref_u8.numpy())
    base = load_fast_engine(get_card("demo-ki67"), options.models_dir)
    assert not np.array_equal(engine.translate(tiles), base.translate(tiles))
    history = json.loads((res.card.parent / "history.json").read_text())
    assert len(history) == 4 and res.curve.exists()


@pytest.mark.slow
def test_train_lora_cli_makes_a_model_translate_can_use(cli, tmp_path, monkeypatch, he_ome_path,
                                                        cmu1_path, ki67_ome_paths):
    models = tmp_path / "models"
    monkeypatch.setenv("STAINCTL_MODELS", str(models))
    r = cli("train-lora", "--marker", "ki67", "--he", he_ome_path, "--ihc", ki67_ome_paths[0],
            "--name", "ki67-test", "--steps", "2", "--batch-size", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["card"] == str(models / "ki67-test" / "card.toml")
    listed = json.loads(cli("models", "list", "--json").stdout)["models"]
    assert any(m["name"] == "ki67-test" and m["installed"] for m in listed)
    r = cli("translate", cmu1_path, "--marker", "ki67-test", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "CMU-1-Small-Region.ki67-test.ome.tiff").exists()


def test_a_stopped_adaptation_resumes_from_its_checkpoint(tmp_path, he_ome_path, ki67_ome_paths):
    from dataclasses import replace

    options = AdaptOptions(name="r", marker="ki67", base="demo-ki67", he=(he_ome_path,),
                           ihc=(ki67_ome_paths[1],), out=tmp_path / "r", models_dir=tmp_path,
                           steps=2, batch_size=1, crop=64)
    adapt(options, log=False)
    first = json.loads((tmp_path / "r" / "history.json").read_text())
    adapt(replace(options, steps=3), log=False)  # as a re-run after a kill at step 2
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3] and history[:2] == first
