"""Few-step sampling for pixcell (`--steps 8 --sampler dpm++-karras|unipc`), with the tiny
random networks of the real classes. What these cannot show, and nobody has measured yet: the
quality cost of 8 steps against 20 with real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CMU1
from pixcell_helpers import cmu1_tiles, install_pixcell, tiny_engine

from stainctl.engines.base import SAMPLERS, EngineOptions
from stainctl.engines.pixcell.config import SCHEDULER
from stainctl.engines.pixcell.sampling import make_scheduler
from stainctl.errors import UsageError


@pytest.fixture
def models(use_models):  # type: ignore[no-untyped-def]
    return use_models(install_pixcell)


def test_each_sampler_places_eight_steps_its_own_way() -> None:
    schedules = {}
    for sampler in SAMPLERS:
        s = make_scheduler(dict(SCHEDULER), sampler)
        s.set_timesteps(8)
        t = s.timesteps.numpy()
        assert len(t) == 8 and np.all(np.diff(t) < 0), sampler
        schedules[sampler] = t
    assert type(make_scheduler(dict(SCHEDULER), "unipc")).__name__ == "UniPCMultistepScheduler"
    assert make_scheduler(dict(SCHEDULER), "unipc").config.solver_type == "bh2"
    # Karras sigmas spend more of the few steps at low noise than the linear spacing.
    assert schedules["dpm++-karras"][-1] < schedules["dpm++"][-1]
    assert (schedules["dpm++-karras"] < 200).sum() > (schedules["dpm++"] < 200).sum()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_eight_step_sampling_runs_one_batched_pass_per_step(models: Path, sampler: str) -> None:
    engine = tiny_engine(models, 8, sampler=sampler)
    seen: list[int] = []
    hook = engine.parts.transformer.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[0]))
    tiles = cmu1_tiles(2)
    out = engine.translate(tiles, [5, 6])
    hook.remove()
    assert seen == [4] * 8  # 8 steps, conditional + unconditional of 2 tiles in one pass
    assert out.shape == tiles.shape and out.dtype == np.uint8 and out.std() > 0
    assert np.array_equal(out, engine.translate(tiles, [5, 6]))  # seeded: reruns repeat
    settings = dict(engine.settings())
    if sampler == "dpm++":  # the default leaves the recorded settings as they were
        assert settings == {"steps": 8, "guidance": 1.2, "dtype": "auto"}
    else:
        assert settings["sampler"] == sampler


def test_samplers_give_different_latents(models: Path) -> None:
    from stainctl.engines.pixcell.sampling import initial_noise, sample_latents

    engine = tiny_engine(models, 8)
    cond = engine.tokens(cmu1_tiles(1))
    tr = engine.parts.transformer
    noise = initial_noise([3], (engine.parts.config.latent_channels, 32, 32))
    z = {s: sample_latents(tr, engine.parts.config.scheduler, cond, tr.uncond_embedding.float(),
                           noise, 8, 1.2, torch.float32, s) for s in SAMPLERS}
    assert all(torch.isfinite(v).all() for v in z.values())
    assert not torch.equal(z["dpm++"], z["dpm++-karras"])
    assert not torch.equal(z["dpm++"], z["unipc"])


def test_an_unknown_sampler_is_a_usage_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="--sampler must be one of"):
        EngineOptions(sampler="euler")
    r = cli("translate", CMU1, "--marker", "demo-ki67", "-o", tmp_path / "out",
            "--sampler", "euler")
    assert r.exit_code == 2
    assert "--sampler must be one of dpm++, dpm++-karras, unipc" in r.output


def test_main_job_with_eight_unipc_steps(cli, tmp_path: Path, models: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    out = tmp_path / "out"
    r = cli("translate", CMU1, "--marker", "ki67", "-o", out, "--steps", "8", "--sampler",
            "unipc", "--json")
    assert r.exit_code == 0, r.output
    assert Path(json.loads(r.stdout)["slides"][0]["details"]["output"]).exists()
    db = sqlite3.connect(out / "workspace" / "manifest.sqlite")
    (params,) = db.execute("SELECT params FROM steps WHERE step LIKE 'translate:%'").fetchone()
    db.close()
    recorded = json.loads(params)
    assert recorded["sampler"] == "unipc" and recorded["steps"] == 8
