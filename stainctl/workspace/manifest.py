"""The workspace manifest: one SQLite file (WAL mode), the single source of truth.

Only the driver process writes it; workers hand their results back. Bulk arrays live in files
beside it and are referenced from the `artifacts` table. This module is the only place with SQL:
everything else asks a named method and gets typed records (`records.py`) back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from stainctl.errors import UsageError
from stainctl.workspace.records import (
    ArtifactRecord,
    GridRecord,
    RunRecord,
    SlideRecord,
    SlideSummary,
    StainFitRecord,
    StepRecord,
    StepState,
    TileCell,
    TileRecord,
)
from stainctl.workspace.schema import MIGRATIONS, READ_ONLY_FROM, SCHEMA_V1, SCHEMA_VERSION

if TYPE_CHECKING:
    from sqlite3 import _Parameters  # typeshed's alias for what execute() binds

# Pipeline order, used to report the last step done for a slide.
STEP_ORDER = ("tile", "filter", "embed", "normalize", "translate", "stitch", "evaluate")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def damaged_message(what: object, err: BaseException) -> str:
    """What to say about a manifest SQLite cannot read (random bytes, damaged pages)."""
    cause = "not a database" if "not a database" in str(err) else f"damaged ({err})"
    return (f"{what} is {cause}; restore it from a backup, or start a new workspace (-w NEW) "
            "and run the command again there: the outputs already on disk are kept")


class ManifestDamaged(UsageError):
    """The manifest file is not a database, or its pages are damaged (exit 2)."""


class _Connection(sqlite3.Connection):
    """A connection that names its file when SQLite finds it is not a sound database: while a
    statement runs and while its rows are fetched (damaged pages further on in a table are only
    met there), through the `_Cursor`s it hands out."""

    manifest_path: Path

    def execute(self, sql: str, parameters: _Parameters = (), /) -> _Cursor:
        return self._cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[_Parameters], /) -> _Cursor:
        return self._cursor().executemany(sql, parameters)

    def _cursor(self) -> _Cursor:
        cur = self.cursor(_Cursor)
        cur.manifest_path = self.manifest_path
        return cur


class _Cursor(sqlite3.Cursor):
    """Every way of running a statement and reading its rows turns damage into
    `ManifestDamaged`. The fetch methods return what sqlite3.Cursor's do (rows of the
    connection's row factory, typed Any there), so their return types are not restated."""

    manifest_path: Path

    def execute(self, sql: str, parameters: _Parameters = (), /) -> _Cursor:
        try:
            super().execute(sql, parameters)
        except sqlite3.DatabaseError as err:
            raise _damaged(self.manifest_path, err) from None
        return self

    def executemany(self, sql: str, parameters: Iterable[_Parameters], /) -> _Cursor:
        try:
            super().executemany(sql, parameters)
        except sqlite3.DatabaseError as err:
            raise _damaged(self.manifest_path, err) from None
        return self

    def fetchone(self):
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as err:
            raise _damaged(self.manifest_path, err) from None

    def fetchmany(self, size: int | None = None):
        try:
            return super().fetchmany(self.arraysize if size is None else size)
        except sqlite3.DatabaseError as err:
            raise _damaged(self.manifest_path, err) from None

    def fetchall(self):
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as err:
            raise _damaged(self.manifest_path, err) from None

    def __next__(self):
        try:
            return super().__next__()
        except sqlite3.DatabaseError as err:
            raise _damaged(self.manifest_path, err) from None


def _damaged(path: Path, err: sqlite3.DatabaseError) -> Exception:
    if getattr(err, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return ManifestDamaged(damaged_message(path, err))
    return err


def _connect(path: Path, readonly: bool) -> _Connection:
    """Autocommit (transactions are explicit, see `transaction`). Read-only: `mode=ro`, else,
    where SQLite cannot even make its shared-memory file beside a WAL manifest (a read-only
    mount, an archive), `immutable`, which reads the file as it is."""
    if not readonly:
        db = sqlite3.connect(path, isolation_level=None, timeout=30, factory=_Connection)
        db.manifest_path = path
        return db
    uri = path.absolute().as_uri()
    for mode in ("mode=ro", "immutable=1"):
        db = sqlite3.connect(f"{uri}?{mode}", uri=True, isolation_level=None, timeout=30,
                             factory=_Connection)
        db.manifest_path = path
        try:
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
        except BaseException:  # not a database: said by the caller, nothing left open
            db.close()
            raise
    raise UsageError(f"{path} cannot be opened for reading; check its permissions")


def _wal(db: sqlite3.Connection, wait: float = 30) -> None:
    """Switch to WAL. SQLite does not wait for its busy timeout here: two runs opening a new
    manifest at once can find it busy (`database is locked`), so retry for as long."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Manifest:
    def __init__(self, path: Path, *, create: bool = False, readonly: bool = False) -> None:
        if not path.exists() and not create:
            raise UsageError(
                f"{path.parent} is not a stainctl workspace (no manifest.sqlite); "
                "create one with `stainctl tile SLIDES -w DIR`"
            )
        self.path = path
        self.readonly = readonly
        self.db = _connect(path, readonly)
        self.db.row_factory = sqlite3.Row
        try:
            if not readonly:
                _wal(self.db)
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:  # damaged, newer, locked: the caller gets no Manifest to close
            self.db.close()
            raise

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"{self.path} was written by a newer stainctl (schema {version}, this one "
                f"knows {SCHEMA_VERSION}); upgrade stainctl to use this workspace"
            )
        if version == SCHEMA_VERSION:
            return
        if self.readonly and version >= READ_ONLY_FROM:
            return  # an older, additive schema: read as it is (an archived workspace)
        if self.readonly:
            raise UsageError(f"{self.path} has schema {version}, this stainctl reads "
                             f"{SCHEMA_VERSION}; run a command that writes to the workspace "
                             "(e.g. `stainctl tile`) once to upgrade it")
        with self.transaction():
            # Under the write lock now: a run that opened a new workspace at the same moment
            # may have set the schema up since the version was read.
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                for stmt in _statements(SCHEMA_V1):
                    self.db.execute(stmt)
                version = 1
            while version < SCHEMA_VERSION:
                for stmt in _statements(MIGRATIONS[version]):
                    self.db.execute(stmt)
                version += 1
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- runs -------------------------------------------------------------------------------
    def start_run(self, command: str, params: Mapping[str, object], versions: Mapping[str, str],
                  host: str, pid: int) -> int:
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO runs (command, params, versions, host, pid, started) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (command, json.dumps(params, default=str), json.dumps(versions), host, pid, now()),
            )
        return int(cur.lastrowid or 0)

    def close_dead_runs(self) -> int:
        """Mark runs that never recorded an outcome (killed with SIGKILL, power lost) as
        interrupted; the caller holds the writer lock, so none of them is still going."""
        with self.transaction():
            cur = self.db.execute("UPDATE runs SET outcome='interrupted' WHERE outcome IS NULL")
        return int(cur.rowcount)

    def live_run(self) -> int | None:
        """The latest run without an outcome: the one going on while the lock is held."""
        row = self.db.execute("SELECT MAX(id) FROM runs WHERE outcome IS NULL").fetchone()
        return None if row[0] is None else int(row[0])

    def end_run(self, run_id: int, outcome: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE runs SET ended=?, outcome=? WHERE id=?",
                            (now(), outcome, run_id))

    def runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        return [RunRecord.from_row(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    # --- slides -----------------------------------------------------------------------------
    def slide_by_path(self, path: str) -> SlideRecord | None:
        row = self.db.execute("SELECT * FROM slides WHERE path=?", (path,)).fetchone()
        return None if row is None else SlideRecord.from_row(row)

    def slide_by_key(self, key: str) -> SlideRecord | None:
        row = self.db.execute("SELECT * FROM slides WHERE key=?", (key,)).fetchone()
        return None if row is None else SlideRecord.from_row(row)

    def slides(self) -> list[SlideRecord]:
        return [SlideRecord.from_row(r)
                for r in self.db.execute("SELECT * FROM slides ORDER BY id")]

    def slides_done(self, step: str) -> list[SlideRecord]:
        """The slides whose `step` is done: the input of the next step."""
        return [SlideRecord.from_row(r) for r in self.db.execute(
            "SELECT s.* FROM slides s JOIN steps t ON t.slide_id = s.id "
            "WHERE t.step = ? AND t.state = 'done' ORDER BY s.id", (step,))]

    def add_slide(self, path: str, stem: str, fingerprint: str) -> SlideRecord:
        """Register a slide (or return the existing one); its key is unique in the workspace."""
        row = self.slide_by_path(path)
        if row is not None:
            return row
        taken = {r[0] for r in self.db.execute("SELECT key FROM slides")}
        key, n = stem, 1
        while key in taken:
            n += 1
            key = f"{stem}-{n}"
        with self.transaction():
            self.db.execute(
                "INSERT INTO slides (key, path, fingerprint, added) VALUES (?, ?, ?, ?)",
                (key, path, fingerprint, now()))
        row = self.slide_by_path(path)
        assert row is not None
        return row

    def describe_slide(self, slide_id: int, *, fingerprint: str, backend: str,
                       vendor: str | None, width: int, height: int, levels: str,
                       mpp: float | None, mpp_source: str | None,
                       objective_power: float | None) -> None:
        """What `tile` learnt on opening the slide."""
        with self.transaction():
            self.db.execute(
                "UPDATE slides SET fingerprint=?, backend=?, vendor=?, width=?, height=?, "
                "levels=?, mpp=?, mpp_source=?, objective_power=? WHERE id=?",
                (fingerprint, backend, vendor, width, height, levels, mpp, mpp_source,
                 objective_power, slide_id))

    def set_slide_warning(self, slide_id: int, warning: str | None) -> None:
        """What `tile` found suspect in the slide (None: nothing), shown by every later run."""
        with self.transaction():
            self.db.execute("UPDATE slides SET warning=? WHERE id=?", (warning, slide_id))

    # --- steps ------------------------------------------------------------------------------
    def step(self, slide_id: int, step: str) -> StepRecord | None:
        row = self.db.execute(
            "SELECT * FROM steps WHERE slide_id=? AND step=?", (slide_id, step)).fetchone()
        return None if row is None else StepRecord.from_row(row)

    def set_step(self, slide_id: int, step: str, state: StepState, *,
                 params_hash: str | None = None, params: Mapping[str, object] | None = None,
                 error: str | None = None, code: str | None = None,
                 run_id: int | None = None) -> None:
        """`error`: why the step failed, a sentence naming the fix; `code`: its kind."""
        stamp = now()
        with self.transaction():
            self.db.execute(
                "INSERT INTO steps (slide_id, step, params_hash, params, state, error, code, "
                "run_id, started, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (slide_id, step) DO UPDATE SET params_hash=excluded.params_hash, "
                "params=excluded.params, state=excluded.state, error=excluded.error, "
                "code=excluded.code, run_id=excluded.run_id, "
                "started=CASE WHEN excluded.state='running' THEN excluded.started ELSE started END,"
                " finished=excluded.finished",
                (slide_id, step, params_hash, json.dumps(params) if params else None, state,
                 error, code, run_id, stamp, None if state == "running" else stamp))

    # --- stain normalisation ---------------------------------------------------------------
    def record_stain_fit(self, slide_id: int, step: str, method: str,
                         source: Mapping[str, object], target: Mapping[str, object]) -> None:
        """Keep what a step fitted for a slide (replacing that step's earlier fit)."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO stain_fits (slide_id, step, method, params, created) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (slide_id, step) DO UPDATE SET "
                "method=excluded.method, params=excluded.params, created=excluded.created",
                (slide_id, step, method, json.dumps({"source": source, "target": target}),
                 now()))

    def stain_fits(self, slide_id: int | None = None) -> list[StainFitRecord]:
        """The stain fits of one slide (or all); none in a workspace older than schema 3."""
        if not self._has_table("stain_fits"):
            return []  # read-only at an older schema
        where, args = ("WHERE slide_id=?", (slide_id,)) if slide_id is not None else ("", ())
        return [StainFitRecord.from_row(r) for r in self.db.execute(
            f"SELECT * FROM stain_fits {where} ORDER BY slide_id, step", args)]

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                               (name,)).fetchone() is not None

    # --- grid and tiles ---------------------------------------------------------------------
    def grid(self, slide_id: int) -> GridRecord | None:
        row = self.db.execute("SELECT * FROM grids WHERE slide_id=?", (slide_id,)).fetchone()
        return None if row is None else GridRecord.from_row(row)

    def replace_grid(self, grid: GridRecord, tiles: Iterable[TileCell]) -> None:
        """Replace the slide's grid and tiles; whatever was made from the old grid goes stale."""
        slide_id = grid.slide_id
        with self.transaction():
            self.db.execute("DELETE FROM tiles WHERE slide_id=?", (slide_id,))
            self.db.execute("DELETE FROM grids WHERE slide_id=?", (slide_id,))
            self.db.execute("DELETE FROM steps WHERE slide_id=? AND step != 'tile'", (slide_id,))
            self.db.execute("UPDATE artifacts SET stale=1 WHERE slide_id=? AND kind NOT IN "
                            "('thumbnail', 'tissue_mask')", (slide_id,))
            self.db.execute(
                "INSERT INTO grids (slide_id, params_hash, target_mpp, tile_size, overlap, "
                "extent0, stride0, cols, rows, min_tissue) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                grid.values())
            self.db.executemany(
                "INSERT INTO tiles (slide_id, col, row, x, y, tissue, in_tissue) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((slide_id, t.col, t.row, t.x, t.y, t.tissue, int(t.in_tissue)) for t in tiles))

    def tiles(self, slide_id: int) -> list[TileRecord]:
        """Every grid tile of the slide, in raster order."""
        return self._tiles("slide_id=?", slide_id)

    def tissue_tiles(self, slide_id: int) -> list[TileRecord]:
        """The tiles on tissue (what `translate` generates), in raster order."""
        return self._tiles("slide_id=? AND in_tissue=1", slide_id)

    def kept_tiles(self, slide_id: int) -> list[TileRecord]:
        """The tiles the filter kept (what `embed`, training and evaluation use), in raster
        order."""
        return self._tiles("slide_id=? AND keep=1", slide_id)

    def _tiles(self, where: str, slide_id: int) -> list[TileRecord]:
        # Ids grow in raster order (`tile` inserts row by row), so id order is raster order.
        return [TileRecord.from_row(r) for r in self.db.execute(
            f"SELECT * FROM tiles WHERE {where} ORDER BY id", (slide_id,))]

    def glass_tile(self, slide_id: int, *, margin0: float, reach: float, width: int,
                   height: int) -> TileRecord | None:
        """The tile off the tissue mask with the least tissue that lies, with `margin0` level-0
        px of context before it and `reach` px from its origin onwards, wholly inside the
        `width` x `height` slide; the first in raster order among equals."""
        row = self.db.execute(
            "SELECT * FROM tiles WHERE slide_id=? AND in_tissue=0 AND x>=? AND y>=? "
            "AND x+?<=? AND y+?<=? ORDER BY tissue, row, col LIMIT 1",
            (slide_id, margin0, margin0, reach, width, reach, height)).fetchone()
        return None if row is None else TileRecord.from_row(row)

    def tile_counts(self, slide_id: int) -> dict[str, int]:
        total, tissue = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(in_tissue), 0) FROM tiles WHERE slide_id=?",
            (slide_id,)).fetchone()
        return {"tiles_total": int(total), "tiles_tissue": int(tissue)}

    def clear_metrics(self, slide_id: int) -> None:
        with self.transaction():
            self.db.execute("UPDATE tiles SET laplacian_var=NULL, saturated_frac=NULL, "
                            "white_frac=NULL, keep=NULL WHERE slide_id=?", (slide_id,))

    def unmeasured_tiles(self, slide_id: int) -> list[tuple[int, int, int]]:
        """(id, x, y) of tissue tiles that have no filter metrics yet."""
        return [(int(r[0]), int(r[1]), int(r[2])) for r in self.db.execute(
            "SELECT id, x, y FROM tiles WHERE slide_id=? AND in_tissue=1 "
            "AND laplacian_var IS NULL ORDER BY id", (slide_id,))]

    def tile_positions(self, slide_id: int, tile_ids: Iterable[int]) -> list[tuple[int, int]]:
        """Level-0 (x, y) of the slide's tiles `tile_ids`, in that order."""
        xy = {int(i): (int(x), int(y)) for i, x, y in self.db.execute(
            "SELECT id, x, y FROM tiles WHERE slide_id=?", (slide_id,))}
        try:
            return [xy[int(i)] for i in tile_ids]
        except KeyError as err:
            raise UsageError(f"{self.path}: tile {err} is not a tile of slide {slide_id}; the "
                             "slide was re-tiled since: run its steps again") from None

    def store_metrics(self, rows: Iterable[Sequence[float]]) -> None:
        """rows: (tile_id, laplacian_var, saturated_frac, white_frac)."""
        with self.transaction():
            self.db.executemany(
                "UPDATE tiles SET laplacian_var=?, saturated_frac=?, white_frac=? WHERE id=?",
                ((lap, sat, white, int(tid)) for tid, lap, sat, white in rows))

    def judge_tiles(self, slide_id: int, min_laplacian: float, min_saturated: float,
                    max_white: float) -> dict[str, int]:
        """Set keep/reject from the stored metrics; return counts of kept, measured, and of
        tiles failing each criterion (a tile may fail several)."""
        with self.transaction():
            self.db.execute(
                "UPDATE tiles SET keep = (laplacian_var >= ? AND saturated_frac >= ? "
                "AND white_frac <= ?) WHERE slide_id=? AND laplacian_var IS NOT NULL",
                (min_laplacian, min_saturated, max_white, slide_id))
        row = self.db.execute(
            "SELECT COALESCE(SUM(keep), 0), COUNT(laplacian_var), "
            "COALESCE(SUM(laplacian_var < ?), 0), COALESCE(SUM(saturated_frac < ?), 0), "
            "COALESCE(SUM(white_frac > ?), 0) FROM tiles WHERE slide_id=? AND in_tissue=1",
            (min_laplacian, min_saturated, max_white, slide_id)).fetchone()
        keys = ("kept", "measured", "blurry", "faint", "background")
        return {k: int(v) for k, v in zip(keys, row, strict=True)}

    # --- artifacts --------------------------------------------------------------------------
    def record_artifact(self, slide_id: int | None, kind: str, path: str,
                        params_hash: str | None = None) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO artifacts (slide_id, kind, path, params_hash, created, stale) "
                "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (path) DO UPDATE SET "
                "slide_id=excluded.slide_id, kind=excluded.kind, "
                "params_hash=excluded.params_hash, created=excluded.created, stale=0",
                (slide_id, kind, path, params_hash, now()))

    def artifacts(self, slide_id: int, kind: str) -> list[ArtifactRecord]:
        """The slide's current (not stale) artifacts of one kind, oldest first."""
        return [ArtifactRecord.from_row(r) for r in self.db.execute(
            "SELECT * FROM artifacts WHERE slide_id=? AND kind=? AND stale=0 ORDER BY id",
            (slide_id, kind))]

    # --- status -----------------------------------------------------------------------------
    def slide_summaries(self, live_run: int | None = None) -> list[SlideSummary]:
        """Per slide: tile counts, each step's state, the last step done and any error. A step
        left 'running' by any run but `live_run` (the one holding the lock) is 'interrupted'."""
        counts = {
            int(r["slide_id"]): (int(r["total"]), int(r["tissue"] or 0), int(r["measured"]),
                                 int(r["kept"] or 0))
            for r in self.db.execute(
                "SELECT slide_id, COUNT(*) AS total, SUM(in_tissue) AS tissue, "
                "COUNT(laplacian_var) AS measured, SUM(keep) AS kept "
                "FROM tiles GROUP BY slide_id")
        }
        steps: dict[int, dict[str, StepRecord]] = {}
        for r in self.db.execute("SELECT * FROM steps"):
            rec = StepRecord.from_row(r)
            steps.setdefault(rec.slide_id, {})[rec.step] = rec
        fits: dict[int, dict[str, dict[str, object]]] = {}
        for f in self.stain_fits():
            fits.setdefault(f.slide_id, {})[f.step] = f.as_dict()
        out = []
        for s in self.slides():
            total, tissue, measured, kept = counts.get(s.id, (0, 0, 0, 0))
            st = steps.get(s.id, {})
            # Per-marker steps are named like "stitch:ck7".
            done = sorted((n for n, r in st.items() if r.state == "done"), key=_step_rank)
            out.append(SlideSummary(
                slide=s.key, path=s.path, mpp=s.mpp, tiles_total=total, tiles_tissue=tissue,
                tiles_measured=measured, tiles_kept=kept,
                steps={name: _state(r, live_run) for name, r in st.items()},
                last_done=done[-1] if done else None,
                errors={name: r.error for name, r in st.items() if r.state == "failed"},
                codes={name: r.code for name, r in st.items()
                       if r.state == "failed" and r.code is not None},
                warning=s.warning, stain_fits=fits.get(s.id, {})))
        return out


def _state(step: StepRecord, live_run: int | None) -> str:
    if step.state == "running" and (live_run is None or step.run_id != live_run):
        return "interrupted"
    return step.state


def _step_rank(step: str) -> int:
    base = step.split(":", 1)[0]
    return STEP_ORDER.index(base) if base in STEP_ORDER else len(STEP_ORDER)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
