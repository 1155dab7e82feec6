"""Progress counts only slides that do work: a rerun that skips a slide shows no "1/2" for it."""

from __future__ import annotations

import itertools
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


def _count_lines(steps: list[float], total: int, monkeypatch) -> list[tuple[float, str]]:
    """The count lines _LogProgress writes when item i of `total` is done at time steps[i]."""
    from stainctl.cli import output

    lines: list[tuple[float, str]] = []
    now = [0.0]

    class Log:
        def info(self, fmt: str, *args: object) -> None:
            lines.append((now[0], fmt % args))

    monkeypatch.setattr(output, "log", Log())
    p = output._LogProgress(quiet=False, clock=lambda: now[0])
    p.start("readout", total)
    for t in steps:
        now[0] = t
        p.advance()
    return lines


def test_count_lines_every_ten_percent_but_not_every_instant(monkeypatch):
    """A job of a fraction of a second writes its start line only; a long one a line every
    ~10 %; one of a few seconds a line at most every 2 s; a slow one a line every 30 s."""
    quick = _count_lines([0.3 * i / 18 for i in range(1, 19)], 18, monkeypatch)
    assert [text for _, text in quick] == ["readout: 18 to do"]

    slow = _count_lines([float(i) for i in range(1, 101)], 100, monkeypatch)
    assert [text for _, text in slow[1:]] == [f"readout: {n}/100 ({n}%)"
                                              for n in range(10, 100, 10)]

    seconds = _count_lines([0.1 * i for i in range(1, 51)], 50, monkeypatch)
    times = [t for t, _ in seconds]
    assert 2 <= len(times) <= 4 and all(b - a >= 2.0 for a, b in itertools.pairwise(times))

    crawl = _count_lines([45.0 * i for i in range(1, 6)], 1000, monkeypatch)  # 0.1 % a step
    assert len(crawl) == 5 and "5/1000" in crawl[-1][1]


def test_count_lines_round_the_percentage_but_never_say_100_before_the_end(monkeypatch):
    thirds = _count_lines([3.0 * i for i in range(1, 7)], 6, monkeypatch)
    assert "readout: 4/6 (67%)" in [text for _, text in thirds]
    last = _count_lines([35.0 * i for i in range(1, 201)], 200, monkeypatch)
    assert "readout: 199/200 (99%)" in [text for _, text in last]
    assert not any("(100%)" in text for _, text in last)
