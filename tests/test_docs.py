"""docs/ARCHITECTURE.md is where a newcomer starts: every file it names must exist."""

from __future__ import annotations

import re

from conftest import ROOT


def test_architecture_names_only_files_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.(?:py|md))", text))
    assert len(named) > 15  # the guide points at real places
    missing = sorted(p for p in named
                     if not (ROOT / "stainctl" / p).exists() and not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_code_comments_cite_notes_that_are_in_the_repository():
    cited = [p for p in (ROOT / "stainctl").rglob("*.py") if "NOTES.md" in p.read_text()]
    assert cited and (ROOT / "docs" / "NOTES.md").exists()
    for p in cited:
        assert "docs/NOTES.md" in p.read_text(), p
