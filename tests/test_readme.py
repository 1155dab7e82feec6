"""The README's two set-up commands stay true: CI runs the test one verbatim, and the main job
runs on the bundled sample."""

from __future__ import annotations

import re

from conftest import ROOT


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _commands()
    assert "stainctl/samples/CMU-1-Small-Region.svs" in main_job
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_runs_on_the_bundled_sample(cli, tmp_path, monkeypatch):
    main_job, _ = _commands()
    steps = main_job.split(" && ")[3:]  # after venv, activate and pip install
    assert [s.split()[1] for s in steps] == ["tile", "filter", "status"]
    monkeypatch.chdir(ROOT)
    for step in steps:
        args = [a.replace("demo-ws", str(tmp_path / "demo-ws")) for a in step.split()[1:]]
        r = cli(*args)
        assert r.exit_code == 0, (step, r.output)
    assert "CMU-1-Small-Region" in r.stdout
