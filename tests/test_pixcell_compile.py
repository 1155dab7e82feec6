"""torch.compile of the pixcell transformer blocks (`translate --compile/--no-compile`, default on
a GPU), with the tiny random networks of the real classes on a CPU. torch's "eager" and
"aot_eager" backends go through dynamo without a C compiler; what inductor makes of the real
model on a GPU is measured by bench/gpu.py, not here."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CMU1
from pixcell_helpers import cmu1_tiles, install_pixcell, tiny_engine

from stainctl.engines.base import EngineOptions
from stainctl.errors import UsageError

ENGINE_LOG = "stainctl.engines.pixcell.engine"


@pytest.fixture
def models(use_models):  # type: ignore[no-untyped-def]
    return use_models(install_pixcell)


@pytest.fixture(autouse=True)
def _fresh_dynamo():  # type: ignore[no-untyped-def]
    # Compiled graphs are cached per code object across engines: each test starts afresh.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _is_compiled(module: torch.nn.Module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def test_auto_compiles_on_cuda_only_and_a_bad_mode_is_refused() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert EngineOptions().compile == "auto"
    assert EngineOptions().compiles(cuda) and not EngineOptions().compiles(cpu)
    assert EngineOptions(compile="on").compiles(cpu)
    assert not EngineOptions(compile="off").compiles(cuda)
    with pytest.raises(UsageError, match="compile must be one of auto, on, off"):
        EngineOptions(compile="yes")
    # It travels to cluster workers inside EngineKey: hashable and equal by value.
    assert hash(EngineOptions(compile="off")) == hash(EngineOptions(compile="off"))
    assert EngineOptions(compile="off") != EngineOptions()


def test_auto_does_not_compile_on_a_cpu(models: Path) -> None:
    engine = tiny_engine(models)
    assert not engine.compiled
    assert not any(_is_compiled(b) for b in engine.parts.transformer.transformer_blocks)
    assert "compile" not in engine.settings()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_blocks_give_the_tiles_of_eager(models: Path, monkeypatch, backend: str) -> None:  # type: ignore[no-untyped-def]
    import stainctl.engines.pixcell.engine as pixcell

    graphs: list[int] = []

    def counting(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(len(example_inputs))
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(backend)(gm, example_inputs)

    monkeypatch.setattr(pixcell, "COMPILE_BACKEND", counting)
    tiles, seeds = cmu1_tiles(3), [5, 6, 7]
    eager = tiny_engine(models, compile="off").translate(tiles, seeds)
    engine = tiny_engine(models, compile="on")
    blocks = engine.parts.transformer.transformer_blocks
    assert engine.compiled and all(_is_compiled(b) for b in blocks)
    assert engine.settings() == tiny_engine(models, compile="off").settings()  # not recorded
    out = engine.translate(tiles, seeds)
    assert graphs, "the blocks were not compiled"
    assert engine.compiled  # still: nothing failed
    assert np.abs(out.astype(int) - eager).max() <= 1  # float rounding at most
    # A partial batch has another shape: compiled again (dynamic=False), same tiles.
    compiled = len(graphs)
    part = engine.translate(tiles[:1], seeds[:1])
    assert len(graphs) > compiled
    assert np.abs(part[0].astype(int) - eager[0]).max() <= 2  # batching changes float bits


@pytest.mark.slow
@pytest.mark.parametrize("where", ["first call", "torch.compile"])
def test_a_failing_compile_falls_back_to_eager_with_one_warning(
        models: Path, monkeypatch, caplog, where: str) -> None:  # type: ignore[no-untyped-def]
    import stainctl.engines.pixcell.engine as pixcell

    def broken(gm, example_inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no working C compiler found\nmore detail")

    monkeypatch.setattr(pixcell, "COMPILE_BACKEND",
                        broken if where == "first call" else "no-such-backend")
    tiles, seeds = cmu1_tiles(2), [3, 4]
    eager = tiny_engine(models, compile="off").translate(tiles, seeds)
    with caplog.at_level(logging.WARNING, logger=ENGINE_LOG):
        engine = tiny_engine(models, compile="on")
        first = engine.translate(tiles, seeds)
        again = engine.translate(tiles[:1], seeds[:1])
    assert not engine.compiled
    assert not any(_is_compiled(b) for b in engine.parts.transformer.transformer_blocks)
    warnings = [r.getMessage() for r in caplog.records if r.name == ENGINE_LOG]
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0] and "--no-compile" in warnings[0]
    assert ("no working C compiler" if where == "first call" else "no-such-backend") \
        in warnings[0]
    assert np.array_equal(first, eager)  # the batch gives what eager gives
    assert np.array_equal(again[0], tiny_engine(models, compile="off").translate(tiles[:1],
                                                                            seeds[:1])[0])


def test_an_error_that_is_not_compiles_still_raises(models: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import stainctl.engines.pixcell.engine as pixcell

    monkeypatch.setattr(pixcell, "COMPILE_BACKEND", "eager")
    engine = tiny_engine(models, compile="on")
    calls: list[int] = []

    def bad_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise ValueError("scheduler bug")

    monkeypatch.setattr("stainctl.engines.pixcell.sampling.sample_latents", bad_step)
    with pytest.raises(ValueError, match="scheduler bug"):
        engine.translate(cmu1_tiles(1), [1])
    # Retried once uncompiled; eager failing too says the error is not compile's, so the
    # compiled blocks stay for the next batch (one out-of-memory batch must not turn them off).
    assert len(calls) == 2 and engine.compiled


@pytest.mark.parametrize(("flags", "mode"), [((), "auto"), (("--compile",), "on"),
                                             (("--no-compile",), "off")])
def test_the_compile_flag_reaches_the_engine_options(cli, tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                     flags: tuple[str, ...], mode: str) -> None:
    from stainctl.steps import translate
    from stainctl.workspace import Workspace

    seen: list[EngineOptions] = []

    def capture(card, directory, options):  # type: ignore[no-untyped-def]
        seen.append(options)
        raise UsageError("captured")

    monkeypatch.setattr(translate, "load_engine", capture)
    Workspace.open(tmp_path / "ws", create=True)
    r = cli("translate", "-w", tmp_path / "ws", "--marker", "demo-ki67", *flags)
    assert "captured" in r.output
    assert [o.compile for o in seen] == [mode]


def test_compile_and_no_compile_together_are_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("translate", CMU1, "--marker", "demo-ki67", "-o", tmp_path / "out", "--compile",
            "--no-compile")
    assert r.exit_code == 2
    assert "give --compile or --no-compile, not both" in r.output
    assert not (tmp_path / "out" / "workspace").exists()
