"""What a first-time user trips over (the fifth new-user run): each test failed before its fix."""

from __future__ import annotations

import re

import pytest
from models_helpers import install_fast


@pytest.fixture
def models(use_models):
    return use_models(install_fast)


def _to_do(stderr: str, step: str) -> list[int]:
    return [int(n) for n in re.findall(rf"INFO {step}: (\d+) to do", stderr)]


@pytest.mark.slow
def test_a_resumed_translate_counts_only_the_tiles_left(cli, tmp_path, models, cmu1_path):
    # Ctrl-C in a translate, then the same command: the progress said "18 to do" and ended at
    # "10/18" when 8 tiles were in the store already.
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
    assert cli("filter", "-w", ws).exit_code == 0
    first = cli("translate", "-w", ws, "--marker", "test-ki67")
    total = _to_do(first.stderr, "translate")
    assert total and total[0] > 3, first.stderr
    chunks = sorted((ws / "slides" / "CMU-1-Small-Region" / "translated" /
                     "test-ki67.zarr" / "c").glob("*/*/0/0/0"))
    for c in chunks[:3]:  # as if the run had been stopped before writing them
        c.unlink()
    from stainctl.workspace import Workspace

    w = Workspace.open(ws)
    sid = w.manifest.slides()[0].id
    row = w.manifest.step(sid, "translate:test-ki67")
    assert row is not None
    w.manifest.set_step(sid, "translate:test-ki67", "running", params_hash=row.params_hash,
                        params=row.params)
    w.close()
    again = cli("translate", "-w", ws, "--marker", "test-ki67")
    assert again.exit_code == 0, again.output
    assert _to_do(again.stderr, "translate") == [3], again.stderr
    # Its counter lines count up to the 3, never past them.
    counts = re.findall(r"INFO translate: (\d+)/(\d+) ", again.stderr)
    assert all(int(total) == 3 for _, total in counts), again.stderr
