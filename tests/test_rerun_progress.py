"""Progress counts only slides that do work: a rerun that skips a slide shows no "1/2" for it."""

from __future__ import annotations

import re


def _counter_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if re.search(r"tile: (\d+/\d+|\d+ to do)", ln)]


def test_a_rerun_does_not_count_skipped_slides_as_progress(cli, tmp_path, cmu1_path, he_ome_path):
    ws = tmp_path / "ws"
    assert cli("tile", cmu1_path, "-w", ws).exit_code == 0
    # One slide done before, one new: the skipped one is no step of progress.
    r = cli("tile", cmu1_path, he_ome_path, "-w", ws)
    assert r.exit_code == 0, r.output
    assert "CMU-1-Small-Region: skipped" in r.stderr
    assert not _counter_lines(r.stderr), r.stderr
    # Both done: nothing counted at all.
    r = cli("tile", cmu1_path, he_ome_path, "-w", ws)
    assert "nothing to do" in r.stdout
    assert not _counter_lines(r.stderr), r.stderr


def test_the_bar_leaves_out_skipped_items():
    from stainctl.cli.output import _LogProgress, _RichProgress

    with _RichProgress() as p:
        p.start("tile", 3)
        p.drop()  # skipped before any work: the bar starts at 2
        p.advance()
        p.drop()
        [task] = p.bar.tasks
        assert (task.completed, task.total) == (1, 1)

    log = _LogProgress(quiet=False)
    log.start("tile", 3)
    log.drop(2)
    log.advance()
    assert (log.done, log.total) == (1, 1)
