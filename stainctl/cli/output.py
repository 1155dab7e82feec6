"""What the person or the script sees: rich progress on a terminal, plain timestamped lines when
not on one (cron), one JSON document with --json. Exit codes: 0 done, 1 some slides failed,
2 usage error."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from stainctl.errors import StainctlError, UsageError

if TYPE_CHECKING:
    from stainctl.steps.report import BatchResult, Progress
    from stainctl.workspace import Workspace

log = logging.getLogger("stainctl")


@dataclass
class Output:
    json: bool = False
    quiet: bool = False
    verbose: int = 0

    def __post_init__(self) -> None:
        level = logging.WARNING if self.quiet else (
            logging.DEBUG if self.verbose else logging.INFO)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%Y-%m-%dT%H:%M:%S"))
        root = logging.getLogger("stainctl")
        root.handlers[:] = [handler]
        root.setLevel(level)
        root.propagate = False

    @property
    def interactive(self) -> bool:
        return sys.stderr.isatty() and not self.json and not self.quiet

    @contextmanager
    def progress(self) -> Iterator[Any]:
        if self.interactive:
            with _RichProgress() as p:
                yield p
        else:
            yield _LogProgress(quiet=self.quiet or self.json)

    def error(self, message: str) -> None:
        if self.json:
            print(json.dumps({"ok": False, "error": message}))
        typer.echo(f"error: {message}", err=True)

    def emit(self, data: dict[str, Any], human: Callable[[], None]) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str))
        elif not self.quiet:
            human()
        else:  # --quiet prints errors: a failed slide is one, else exit 1 came without a word
            for s in data.get("slides", []):
                if isinstance(s, dict) and s.get("state") == "failed":
                    # As the summary table labels it: a fluorescence slide is "left out".
                    typer.echo(f"{s.get('label')}: {s.get('slide')}: {s.get('message')}",
                               err=True)


def run_command(out: Output, body: Callable[[], int], manifest: Path | None = None) -> NoReturn:
    """Run a command body; turn stainctl errors, OS errors and signals into one message and an
    exit code (SIGINT and SIGTERM are handled here, for every command, and nowhere else).
    `manifest`: the workspace manifest a batch writes, named when SQLite reports a full disk."""
    from stainctl import interrupt

    try:
        with interrupt.handling_signals():
            code = body()
    except UsageError as err:
        out.error(str(err))
        raise typer.Exit(2) from None
    except StainctlError as err:
        out.error(str(err))
        raise typer.Exit(1) from None
    except sqlite3.DatabaseError as err:
        log.debug("manifest error", exc_info=True)  # -v: the traceback
        out.error(_sqlite_message(err, manifest))
        raise typer.Exit(1 if _disk_full(err) else 2) from None
    except OSError as err:
        log.debug("OS error", exc_info=True)
        out.error(_os_message(err))
        raise typer.Exit(1 if _disk_full(err) else 2) from None
    except interrupt.Interrupted as err:
        out.error(f"stopped by {err.name}: what finished is saved (the run is recorded as "
                  "interrupted); run the same command again to resume")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        out.error("interrupted; what finished is saved, run the same command to resume")
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@dataclass(frozen=True, kw_only=True)
class Batch:
    """What a batch command runs: built, and its options checked, before the workspace is
    opened, so a usage error leaves no workspace behind."""

    params: Mapping[str, object]  # recorded with the run
    step: Callable[[Workspace, Progress], BatchResult]
    # More lines for a person after the summary (e.g. where `tile` put the thumbnails).
    after: Callable[[Workspace, BatchResult], None] | None = None


def run_batch(out: Output, workspace: Path, command: str, prepare: Callable[[], Batch], *,
              create: bool = False) -> NoReturn:
    """The body of a batch command: `prepare()` (parse and check the arguments), then open the
    workspace (`create` it for commands that add slides), hold the writer lock, run the step,
    record the run (partial if some slides failed), print the summary."""

    def body() -> int:
        from stainctl.cli.render import batch_summary
        from stainctl.workspace import Workspace

        batch = prepare()
        created = _missing_dirs(Path(workspace)) if create else []
        ws = Workspace.open(workspace, create=create)
        # A usage error in the step removes what this run `created` (under its lock, see
        # Workspace.writing).
        with ws.writing(command, batch.params, created=created), out.progress() as progress:
            result = batch.step(ws, progress)
            ws.partial = bool(result.failed)

        def human() -> None:
            batch_summary(result)
            if batch.after is not None:
                batch.after(ws, result)

        out.emit(result.as_dict(), human)
        return int(result.exit_code)

    from stainctl.workspace.workspace import MANIFEST

    run_command(out, body, Path(workspace) / MANIFEST)


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    path = path.resolve()
    return [p for p in (path, *path.parents) if not p.exists()]


def _disk_full(err: BaseException) -> bool:
    import errno

    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return "disk is full" in str(err) or "disk I/O error" in str(err)


DISK_FULL = "free space and run the same command again: finished work is kept and skipped"


def _os_message(err: OSError) -> str:
    """One line naming the path and the cause (read-only, permission denied, not a
    directory, disk full...)."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    cause = err.strerror or str(err)
    if _disk_full(err):
        return f"disk full{' writing ' + where if where else ''} ({cause}); {DISK_FULL}"
    return (f"{where or 'a file'}: {cause}; check the path and its permissions, or choose "
            "another folder (-o / -w)")


def _sqlite_message(err: sqlite3.DatabaseError, manifest: Path | None = None) -> str:
    from stainctl.workspace.manifest import damaged_message

    if _disk_full(err):  # SQLite names no file: a cron log must say which disk
        return f"disk full{f' writing {manifest}' if manifest else ''} ({err}); {DISK_FULL}"
    if getattr(err, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return damaged_message("the workspace manifest", err)
    return f"the workspace manifest cannot be used ({err})"


class _LogProgress:
    """Plain lines for logs: per-slide lines, and for a step that works through tiles, a start
    line and a line every ~10 %, at most one every `GAP` seconds (a job of a few seconds, such
    as a readout of 18 tiles, would otherwise print nine lines in a fraction of a second), and
    one at least every `EVERY` seconds however slow the work.

    The start line waits for the first work: a step's total counts what it will look at, and on
    a rerun the slides already done are skipped without any work, so "18 to do" would be
    followed by "skipped" (the per-slide lines say what happened to each slide)."""

    GAP = 2.0
    EVERY = 30.0

    def __init__(self, quiet: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self.clock = clock
        self.total = self.done = 0
        self.name = ""
        self.last = 0.0  # when the last line about the count was written
        self.next_pct = 10
        self.pending = False  # the start line is not written yet
        self.slide_lines = 0

    def start(self, description: str, total: int) -> None:
        self.name, self.total, self.done, self.last, self.next_pct = description, total, 0, \
            self.clock(), 10
        self.pending, self.slide_lines = True, 0

    def advance(self, n: int = 1) -> None:
        now = self.clock()
        if self.pending and not self.slide_lines and not self.quiet:
            log.info("%s: %d to do", self.name, self.total)
            self.last = now
        self.pending = False
        self.done += n
        pct = 100 * self.done // max(self.total, 1)
        since = now - self.last
        if not self.quiet and self.done < self.total and (
                (pct >= self.next_pct and since >= self.GAP) or since > self.EVERY):
            # Rounded ("4/6 (67%)"), never 100 % while work is left.
            shown = min(round(100 * self.done / self.total), 99)
            log.info("%s: %d/%d (%d%%)", self.name, self.done, self.total, shown)
            self.next_pct = pct - pct % 10 + 10
            self.last = now

    def drop(self, n: int = 1) -> None:
        self.total = max(self.total - n, self.done)

    def log(self, message: str, warning: bool = False) -> None:
        self.slide_lines += 1
        line = f"{self.name}: {message}" if self.name else message
        if warning:  # shown even with --quiet
            log.warning("%s", line)
        elif not self.quiet:  # named by step: the main job writes one line per step and slide
            log.info("%s", line)


class _RichProgress:
    def __enter__(self) -> _RichProgress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console)
        self.bar.__enter__()
        self.task: Any = None
        self.pending: tuple[str, int] | None = None
        self.name = ""
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def start(self, description: str, total: int) -> None:
        # The bar appears with the first work (see _LogProgress): a rerun that skips every
        # slide leaves no bar stuck at 0/18.
        self.pending = (description, total)
        self.name = description

    def advance(self, n: int = 1) -> None:
        if self.pending is not None:
            self.task = self.bar.add_task(self.pending[0], total=self.pending[1])
            self.pending = None
        if self.task is not None:
            self.bar.advance(self.task, n)

    def drop(self, n: int = 1) -> None:
        if self.pending is not None:
            self.pending = (self.pending[0], max(self.pending[1] - n, 0))
        elif self.task is not None:
            [task] = [t for t in self.bar.tasks if t.id == self.task]
            self.bar.update(self.task, total=max((task.total or 0) - n, task.completed))

    def log(self, message: str, warning: bool = False) -> None:
        line = f"{self.name}: {message}" if self.name else message  # as _LogProgress
        self.console.print(line, highlight=False, markup=False,
                           style="yellow" if warning else None)
