"""The README's two set-up commands stay true: CI runs the test one verbatim, and the main job
runs on the bundled sample."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _commands()
    assert "stainctl/samples/CMU-1-Small-Region.svs" in main_job
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_readme_main_job_runs_on_the_bundled_sample(cli, tmp_path, monkeypatch):
    main_job, _ = _commands()
    steps = main_job.split(" && ")[3:]  # after venv, activate and pip install
    assert [s.split()[1] for s in steps] == ["translate"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STAINCTL_MODELS", str(tmp_path / "no-user-models"))
    args = [str(tmp_path / "out") if a == "out" else a for a in steps[0].split()[1:]]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "CMU-1-Small-Region.demo-ki67.ome.tiff").exists()
    assert (tmp_path / "out" / "CMU-1-Small-Region.demo-ki67.side-by-side.png").exists()
