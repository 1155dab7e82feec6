"""CLI conventions: fast start-up, version, exit codes, generated man page and completions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from stainctl import __version__
from stainctl.cli.docs import expected_files

HEAVY = ("torch", "dask", "distributed", "pyvips", "numpy", "cv2", "openslide", "tiffslide")


@pytest.mark.parametrize("argv", [["--help"], ["tile", "--help"], ["filter", "--help"],
                                  ["status", "--help"], ["--version"]])
def test_startup_imports_no_heavy_module(argv):
    code = textwrap.dedent(f"""
        import sys
        sys.argv = ["stainctl", *{argv!r}]
        from stainctl.cli.app import main
        try:
            main()
        except SystemExit:
            pass
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print("HEAVY:", ",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY:"


def test_version(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"stainctl {__version__}"


def test_train_lora_usage_errors_say_what_each_engine_needs(cli, tmp_path):
    r = cli("train-lora", "--engine", "pixcell", "--marker", "ck7", "--ihc", "b.svs",
            "-o", tmp_path / "m")
    assert r.exit_code == 2 and "needs an IHC workspace (-w)" in r.stderr
    r = cli("train-lora", "--engine", "gan", "--marker", "ck7", "-o", tmp_path / "m")
    assert r.exit_code == 2 and "--engine must be fast or pixcell" in r.stderr
    assert not (tmp_path / "m").exists()


def test_usage_errors_exit_2(cli, tmp_path):
    assert cli("tile", "x.svs", "-w", tmp_path, "--overlap", "600").exit_code == 2
    assert cli("tile", "-w", tmp_path).exit_code == 2  # no slides
    assert cli("status", "-w", tmp_path / "nowhere").exit_code == 2
    assert cli("frobnicate").exit_code == 2


@pytest.mark.parametrize("path", [[], ["translate"], ["models", "list"]])
def test_help_command_shows_the_commands_own_help(cli, path):
    r = cli("help", *path)
    assert r.exit_code == 0, r.output
    assert r.stdout == cli(*path, "--help").stdout
    assert r.stdout.startswith(f"Usage: stainctl {' '.join(path)}".rstrip())


@pytest.mark.parametrize(("line", "expected"), [
    ("stainctl help tr", {"train", "train-lora", "translate", "train-align"}),
    ("stainctl help models ", {"list", "show", "pull", "add"}),
    ("stainctl help frobnicate ", set()),
])
def test_help_command_completes_command_names(line, expected):
    assert set(_complete("bash", line).stdout.split()) == expected


def test_help_command_refuses_an_unknown_command(cli):
    r = cli("help", "frobnicate")
    assert r.exit_code == 2 and "No such command 'frobnicate'" in r.stderr


def test_json_error_is_machine_readable(cli, tmp_path):
    import json

    r = cli("status", "-w", tmp_path / "nowhere", "--json")
    assert r.exit_code == 2
    data = json.loads(r.stdout)
    assert data["ok"] is False and "not a stainctl workspace" in data["error"]


def test_man_page_and_completions_are_up_to_date():
    stale = [rel for rel, text in expected_files().items()
             if not (ROOT / rel).exists() or (ROOT / rel).read_text() != text]
    assert not stale, f"regenerate with `python -m stainctl.cli.docs`: {stale}"


def test_man_page_documents_every_command_and_option():
    from stainctl.cli.docs import command_tree, man_page

    page = man_page()
    root = command_tree()
    for name, cmd in root.commands.items():
        assert f".SS stainctl {name}" in page
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("-"):
                    assert opt.replace("-", "\\-") in page, (name, opt)


def test_shell_completion_answers_from_the_cli():
    env = {**os.environ, "COMP_WORDS": "stainctl filter --max", "COMP_CWORD": "2",
           "_STAINCTL_COMPLETE": "complete_bash"}
    out = subprocess.run([sys.executable, "-m", "stainctl"], env=env, capture_output=True,
                         text=True).stdout
    assert out.split() == ["--max-white"]


def _command_paths() -> list[tuple[str, ...]]:
    from stainctl.cli.docs import command_tree

    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, (*path, name))

    return list(walk(command_tree(), ()))


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "stainctl")
def test_help_at_80_columns_cuts_nothing(cli, path):
    import re

    from stainctl.cli.docs import command_tree

    r = cli(*path, "--help", env={"COLUMNS": "80"})
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    flat = " ".join(r.stdout.split())
    assert "…" not in flat and "<bool>" not in flat and "<list[" not in flat
    cmd = command_tree()
    for name in path:
        cmd = cmd.commands[name]
    ctx = cmd.context_class(cmd, info_name=path[-1] if path else "stainctl")
    for p in cmd.params:
        record = p.get_help_record(ctx)
        if record is None:
            continue
        decl, text = record
        # The whole help text is there (wrapped, not cut), and each part of its
        # [env var: ...; default: ...] note stands on one line.
        text_words = " ".join(text.split())
        assert text_words in flat, (path, decl)
        note = re.search(r"\[([^\[\]]*)\]$", text)
        for part in note.group(1).split("; ") if note else []:
            assert any(part in line for line in lines), (path, decl, part)
        if getattr(p, "is_flag", False):  # a flag reads `--force`, alone
            assert not p.secondary_opts and re.search(
                rf"^\s+(-\w, )?{re.escape(p.opts[-1])}\s\s", r.stdout, re.M), (path, decl)
    for name, sub in getattr(cmd, "commands", {}).items():  # each command's first sentence
        first = " ".join(sub.help.split(". ")[0].split())
        assert first in flat, (path, name)


def _complete(shell: str, line: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Ask the CLI for completions the way the generated bash or fish script does."""
    words = line.split(" ")
    env = {**os.environ, **(env or {}), "_STAINCTL_COMPLETE": f"complete_{shell}",
           "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1),
           "_TYPER_COMPLETE_ARGS": line, "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    return subprocess.run([sys.executable, "-m", "stainctl"], env=env, capture_output=True,
                          text=True)


def test_completion_offers_installed_markers_and_option_choices(tmp_path):
    from models_helpers import FAST_CARD

    site = tmp_path / "models" / "ki67-site"
    site.mkdir(parents=True)
    (site / "card.toml").write_text(FAST_CARD.format(name="ki67-site", marker="ki67"))
    (site / "generator.safetensors").write_bytes(b"x")
    env = {"STAINCTL_MODELS": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    # Installed marker models only (pixcell-mist-her2 has no weights here), with their stain.
    out = _complete("fish", "stainctl translate --marker ", env).stdout
    assert out.splitlines() == ["demo-ki67\tki67", "ki67-site\tki67"]
    assert _complete("bash", "stainctl translate -m ki", env).stdout.split() == ["ki67-site"]
    assert _complete("bash", "stainctl translate --format ").stdout.split() == [
        "ome-tiff", "tiff"]
    assert _complete("bash", "stainctl stitch --format o").stdout.split() == ["ome-tiff"]
    assert _complete("bash", "stainctl evaluate --metrics fid,c").stdout.split() == [
        "fid,cropfid", "fid,colour"]
    assert _complete("bash", "stainctl evaluate --metrics fid,cr").stdout.split() == [
        "fid,cropfid"]
    for command in ("translate", "embed", "evaluate", "train-lora"):
        assert _complete("bash", f"stainctl {command} --device c").stdout.split() == [
            "cpu", "cuda"]


def test_completion_metrics_are_evaluates():
    from stainctl.cli.complete import METRICS
    from stainctl.evaluate.evaluator import METRICS as EVALUATED

    assert METRICS == EVALUATED


@pytest.mark.parametrize("line", ["stainctl translate ", "stainctl tile CMU-1.svs ",
                                  "stainctl translate -o ", "stainctl evaluate --real "])
def test_fish_completes_files_for_slides_and_paths(line):
    # The fish script completes files unless the CLI has words to offer (`is-args` exits 0).
    assert "--no-files" in (ROOT / "completions" / "stainctl.fish").read_text()
    env = {**os.environ, "_STAINCTL_COMPLETE": "complete_fish",
           "_TYPER_COMPLETE_FISH_ACTION": "is-args", "_TYPER_COMPLETE_ARGS": line}
    r = subprocess.run([sys.executable, "-m", "stainctl"], env=env, capture_output=True)
    assert r.returncode == 1  # no words of its own: the shell lists files
    env["_TYPER_COMPLETE_ARGS"] = "stainctl translate --format "
    assert subprocess.run([sys.executable, "-m", "stainctl"], env=env).returncode == 0
