"""The pixcell engine with tiny random models of the real classes, on the real CMU-1 sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pixcell_helpers import cmu1_tiles, install_pixcell, tiny_engine, tiny_parts

from stainctl.engines.pixcell.config import FLOW, TRANSFORMER, PixCellConfig
from stainctl.engines.pixcell.flow import FlowMLP, translate_tokens
from stainctl.engines.pixcell.transformer import token_grid_embedding


@pytest.fixture
def models(use_models):
    return use_models(install_pixcell)


def test_full_size_architecture_matches_the_release():
    from stainctl.engines.pixcell.engine import build_transformer

    with torch.device("meta"):
        transformer = build_transformer(PixCellConfig())
        flow = FlowMLP(**FLOW)
    n = sum(p.numel() for p in transformer.parameters())
    assert 600e6 < n < 620e6  # PixArt-XL/2 with a 1536-channel caption projection
    assert transformer.config.caption_num_tokens == 16 and TRANSFORMER["out_channels"] == 32
    assert 23e6 < sum(p.numel() for p in flow.parameters()) < 25e6
    assert PixCellConfig().image_size == 1024 and PixCellConfig().downscale == 8


def test_token_positions_follow_the_crop_grid():
    emb = token_grid_embedding(1536, 16, 64).double()
    assert emb.shape == (16, 1536)
    # 1024-px PixCell: grid coordinates 0..3 stretched to 64 patches / 2, shifted by 64 // 16.
    pos = torch.tensor([4.0, 12.0, 20.0, 28.0], dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(384, dtype=torch.float64) / 384)
    row, col = 1, 2  # token 6: the first half encodes its column, the second its row
    expect = torch.cat([torch.sin(pos[col] * omega), torch.cos(pos[col] * omega),
                        torch.sin(pos[row] * omega), torch.cos(pos[row] * omega)])
    assert torch.allclose(emb[row * 4 + col], expect.float().double(), atol=1e-6)


def test_untrained_flow_is_the_identity_and_a_trained_one_moves_tokens():
    tokens = torch.randn(2, 16, 32) * 3
    flow = FlowMLP(channels=32, width=16, time_dim=16, bottleneck=16, blocks=2)
    assert torch.allclose(translate_tokens(flow, tokens, steps=5), tokens, atol=1e-5)
    _, _, _, trained = tiny_parts()
    moved = translate_tokens(trained, tokens, steps=5)
    assert not torch.allclose(moved, tokens, atol=1e-3)
    # Rescaled to each tile's mean token norm.
    assert torch.allclose(moved.norm(dim=-1).mean(1), tokens.norm(dim=-1).mean(1), rtol=1e-5)


def test_released_lora_checkpoint_is_merged_exactly(models):
    from stainctl.engines.pixcell.lora import released_lora_tensors
    from stainctl.models.weights import load_state_dict

    base = tiny_engine(models, name="tiny-pixcell-ki67")  # loaded with its LoRA
    _, plain, _, _ = tiny_parts()
    lora = released_lora_tensors(load_state_dict(models / "tiny-pixcell-ki67" / "lora.pth"))
    assert len(lora) == 2 * 4 * 2  # A and B for q, k, v, out of 2 layers
    merged = dict(base.parts.transformer.named_parameters())
    for name, value in plain.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.lora_A.weight" in lora:
            a, b = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
            assert torch.allclose(merged[name], value + b @ a, atol=1e-6), name  # alpha = rank
        else:
            assert torch.equal(merged[name], value), name


def test_batched_guidance_and_per_tile_seeds(models):
    engine = tiny_engine(models)
    tiles = cmu1_tiles(3)
    seen = []
    hook = engine.parts.transformer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    out = engine.translate(tiles, [11, 12, 13])
    assert seen == [6] * 3  # conditional + unconditional in one pass, 3 solver steps
    seen.clear()
    again = engine.translate(tiles, [11, 12, 13])
    assert np.array_equal(out, again)  # same seeds, same tiles
    other = engine.translate(tiles, [11, 99, 13])
    assert np.array_equal(other[0], out[0]) and not np.array_equal(other[1], out[1])
    alone = engine.translate(tiles[1:2], [12])
    assert np.abs(alone[0].astype(int) - out[1]).max() <= 2  # batching changes float bits only
    hook.remove()


def test_guidance_one_skips_the_unconditional_pass(models):
    engine = tiny_engine(models, guidance=1.0)
    seen = []
    engine.parts.transformer.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[0]))
    engine.translate(cmu1_tiles(2), [1, 2])
    assert seen == [2] * 3


def test_no_flow_variant_conditions_on_the_he_tokens(tmp_path):
    models = tmp_path / "models"
    install_pixcell(models, "tiny-noflow", with_flow=False)
    engine = tiny_engine(models, name="tiny-noflow")
    assert engine.parts.flow is None
    tiles = cmu1_tiles(1)
    assert torch.equal(engine.tokens(tiles), engine.parts.encoder.encode(tiles))
    assert engine.translate(tiles, [3]).shape == (1, 256, 256, 3)


def test_translate_cmu1_to_a_stitched_ome_tiff(cli, tmp_path, models, cmu1_path):
    import tiffslide

    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "ki67", "-o", out, "--steps", "3", "--json")
    assert r.exit_code == 0, r.output
    details = json.loads(r.stdout)["slides"][0]["details"]
    path = Path(details["output"])
    assert path.name == "CMU-1-Small-Region.tiny-pixcell-ki67.ome.tiff"
    slide = tiffslide.TiffSlide(path)
    assert slide.dimensions == (round(2220 * 0.499 / 2), round(2967 * 0.499 / 2))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(2.0, rel=0.01)
    img = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")).astype(int)

    from stainctl.workspace import Workspace

    ws = Workspace.open(out / "workspace")
    grid = ws.manifest.grid(ws.manifest.slides()[0].id)
    assert grid is not None
    assert grid.tile_size == 256 - 2 * 32  # the card's overlap band on each side
    tissue = np.asarray(ws.manifest.db.execute(
        "SELECT x, y, in_tissue FROM tiles ORDER BY row, col").fetchall())
    ws.close()
    # Untranslated tiles are filled with the colour this model gives the slide's glass.
    background = _store_background(out / "workspace")
    scale = 0.499 / 2
    generated, glass = [], []
    for x, y, in_tissue in tissue:
        c, r_ = round(x * scale), round(y * scale)
        patch = img[r_ + 40:r_ + 150, c + 40:c + 150]  # the middle of the tile
        (generated if in_tissue else glass).append(np.abs(patch - background).mean())
    assert glass and generated
    assert max(glass) < 3 and min(generated) > 20  # glass is background, tissue is generated


def _store_background(ws: Path) -> np.ndarray:
    from stainctl.workspace.tilestore import TileStore

    store = TileStore.open(ws / "slides" / "CMU-1-Small-Region" / "translated" /
                           "tiny-pixcell-ki67.zarr", writable=False)
    return np.asarray(store.meta["background"])


def _store(ws: Path) -> dict[tuple[int, int], np.ndarray]:
    from stainctl.workspace.tilestore import TileStore

    store = TileStore.open(ws / "slides" / "CMU-1-Small-Region" / "translated" /
                           "tiny-pixcell-ki67.zarr", writable=False)
    rows, cols = np.nonzero(store.written())
    return {(int(c), int(r)): store.read(int(c), int(r)) for r, c in zip(rows, cols, strict=True)}


@pytest.mark.slow
def test_rerun_is_identical_and_a_killed_run_resumes_to_the_same_output(cli, tmp_path, models,
                                                                       cmu1_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for ws in (ref, cut):
        r = cli("tile", cmu1_path, "-w", ws, "--target-mpp", 2, "--tile-size", 192)
        assert r.exit_code == 0
        assert cli("filter", "-w", ws).exit_code == 0
    args = ["--marker", "tiny-pixcell-ki67", "--steps", "3", "--batch-size", "1", "--seed", 7]
    assert cli("translate", "-w", ref, *args).exit_code == 0
    whole = _store(ref)
    assert len(whole) > 4

    # Kill a run part-way (SIGKILL: nothing gets to clean up), then run again.
    env = {**os.environ, "STAINCTL_MODELS": str(models), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stainctl", "translate", "-w", str(cut),
                             *map(str, args), "-q"], env=env)
    chunks = cut / "slides" / "CMU-1-Small-Region" / "translated" / "tiny-pixcell-ki67.zarr"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.glob("c/*/*/0/0/0"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(chunks.glob("c/*/*/0/0/0")))
    assert 2 <= partial < len(whole)
    r = cli("translate", "-w", cut, *args, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["slides"][0]["details"]["translated_now"] == len(whole) - partial
    resumed = _store(cut)
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[k], whole[k]) for k in whole)

    # Another seed makes another slide; a re-run with the first seed is skipped as done.
    again = json.loads(cli("translate", "-w", ref, *args, "--json").stdout)
    assert again["slides"][0]["state"] == "skipped"
    seed8 = [a if a != 7 else 8 for a in args]
    assert cli("translate", "-w", ref, *seed8).exit_code == 0
    assert not all(np.array_equal(v, whole[k]) for k, v in _store(ref).items())


def test_workspace_tiled_for_another_overlap_is_refused_with_the_fix(cli, tmp_path, models,
                                                                     cmu1_path):
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws, "--target-mpp", 2, "--tile-size", 256).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    r = cli("translate", "-w", ws, "--marker", "tiny-pixcell-ki67", "--steps", 2)
    assert r.exit_code == 0  # 256-px tiles: a model side of 256 means no overlap band
    r = cli("translate", "-w", ws, "--marker", "tiny-pixcell-ki67", "--overlap", 32)
    assert r.exit_code == 1
    assert "--tile-size 192" in r.output
    r = cli("translate", "-w", ws, "--marker", "tiny-pixcell-ki67", "--dtype", "fp16")
    assert r.exit_code == 2 and "fp16 needs a GPU" in r.output


def test_transformer_files_with_or_without_position_tables_load(tmp_path):
    from safetensors.torch import save_file

    from stainctl.engines.pixcell.engine import build_transformer, load_into
    from stainctl.errors import ModelError

    config, transformer, _, _ = tiny_parts()
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    state.pop("y_pos_embed.y_pos_embed")
    state["pos_embed.pos_embed"] = torch.zeros(1, 256, 16)  # as older exports hold it
    save_file(state, str(tmp_path / "t.safetensors"))
    fresh = build_transformer(config)
    load_into(fresh, tmp_path / "t.safetensors", "transformer",
              ("y_pos_embed.y_pos_embed", "pos_embed.pos_embed"))
    assert torch.equal(fresh.uncond_embedding, transformer.uncond_embedding)
    assert torch.equal(fresh.get_buffer("y_pos_embed.y_pos_embed"),
                       transformer.get_buffer("y_pos_embed.y_pos_embed"))
    state.pop("proj_out.weight")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match=r"missing: proj_out\.weight"):
        load_into(build_transformer(config), tmp_path / "bad.safetensors", "transformer",
                  ("y_pos_embed.y_pos_embed", "pos_embed.pos_embed"))


def test_missing_released_weights_stop_the_main_job_before_tiling(cli, tmp_path, monkeypatch,
                                                                  cmu1_path):
    monkeypatch.setenv("STAINCTL_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "pixcell-mist-pr", "-o", out)
    assert r.exit_code == 2
    assert "stainctl models pull pixcell-mist-pr" in r.stderr
    # The transformer's and the VAE's files share a name: the subfolder keeps them apart.
    assert str(tmp_path / "models" / "pixcell-mist-pr" / "transformer" /
               "diffusion_pytorch_model.safetensors") in r.stderr
    assert not (out / "workspace" / "slides").exists()  # nothing was tiled


def test_the_main_job_checks_the_models_a_model_runs_with_before_tiling(cli, tmp_path, models,
                                                                        cmu1_path):
    from stainctl.models.card import card_from_dict
    from stainctl.models.registry import required_cards

    # An adapted card as train-lora writes it: a base, a flow taken from another card.
    adapted = card_from_dict({
        "name": "site2", "kind": "marker", "engine": "pixcell", "marker": "ki67",
        "input_mpp": 2.0, "tile_size": 256, "licence": "t", "intended_use": "t",
        "training_data": "t",
        "architecture": {"base": "tiny-pixcell", "flow_from": "tiny-pixcell-ki67"}})
    assert [c.name for c in required_cards(adapted, models)] == \
        ["site2", "tiny-pixcell", "tiny-uni64", "tiny-pixcell-ki67"]

    # The marker model's own files are all there; its encoder's weights are not.
    (models / "tiny-uni64" / "encoder.bin").unlink()
    rows = {m["name"]: m for m in json.loads(cli("models", "list", "--json").stdout)["models"]}
    assert rows["tiny-pixcell-ki67"]["installed"] and \
        rows["tiny-pixcell-ki67"]["needs"] == ["tiny-uni64"]
    assert "needs tiny-uni64" in cli("models", "list").stdout
    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "--marker", "tiny-pixcell-ki67", "-o", out)
    assert r.exit_code == 2
    assert "model tiny-uni64: its encoder weights are missing" in r.stderr
    assert not (out / "workspace" / "slides").exists()  # nothing was tiled


def test_training_latents_are_what_the_sampler_decodes():
    """train-lora learns on (z - shift) * scale of the VAE configuration, which the sampler's
    decode undoes: a tile encoded for training and decoded as a generated latent comes back as
    the VAE itself decodes z."""
    from stainctl.engines.pixcell.config import LatentScaling
    from stainctl.engines.pixcell.sampling import decode_latents
    from stainctl.engines.pixcell.train import encode_latents, training_latents

    config, _, vae, _ = tiny_parts()
    vae.eval()
    stats = torch.from_numpy(encode_latents(vae, cmu1_tiles(2), "cpu").astype(np.float32))
    c = stats.shape[1] // 2
    stats[:, c:] = 0  # no sampling spread: the training latent is the normalised mean
    x0 = training_latents(stats, config.latents, torch.Generator().manual_seed(0))
    assert config.latents == LatentScaling(scale=1.5305, shift=0.0609)  # SD3.5's, from config
    assert not torch.allclose(x0, stats[:, :c])
    with torch.no_grad():
        direct = vae.decode(stats[:, :c]).sample
    direct = ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    decoded = decode_latents(vae, x0, torch.float32)
    assert np.abs(decoded.numpy().astype(int) - direct.numpy()).max() <= 1
    assert np.abs(decode_latents(vae, stats[:, :c], torch.float32).numpy().astype(int)
                  - direct.numpy()).max() > 1  # raw latents would decode to something else


def test_a_released_lora_made_on_another_base_is_refused(tmp_path):
    from pixcell_helpers import released_lora

    from stainctl.engines.pixcell.lora import check_base_weights, merge_released_lora
    from stainctl.errors import ModelError
    from stainctl.models.weights import load_state_dict

    _, transformer, _, _ = tiny_parts(seed=0)
    _, other, _, _ = tiny_parts(seed=5)
    foreign = released_lora(other, tmp_path / "foreign.pth")
    with pytest.raises(ModelError, match="trained on another base transformer"):
        merge_released_lora(transformer, foreign)
    own = released_lora(transformer, tmp_path / "own.pth")
    assert check_base_weights(transformer, load_state_dict(own), own) == 4
    # Stored in bf16 (as a release may be), the same base still passes.
    state = {k: v.to(torch.bfloat16).float() if "base_layer" in k else v
             for k, v in load_state_dict(own).items()}
    assert check_base_weights(transformer, state, own) == 4
    merge_released_lora(transformer, own)  # and merges
