"""Manifest schema and its migrations. Bump SCHEMA_VERSION and add a migration for each change."""

SCHEMA_VERSION = 4

# Version 1. Coordinates are level-0 pixels, top-left. Filter metrics are NULL until measured;
# `keep` is NULL until the filter step has judged the tile.
SCHEMA_V1 = """
CREATE TABLE slides (
    id              INTEGER PRIMARY KEY,
    key             TEXT NOT NULL UNIQUE,
    path            TEXT NOT NULL UNIQUE,
    fingerprint     TEXT NOT NULL,
    backend         TEXT,
    vendor          TEXT,
    width           INTEGER,
    height          INTEGER,
    levels          TEXT,
    mpp             REAL,
    mpp_source      TEXT,
    objective_power REAL,
    added           TEXT NOT NULL
);
CREATE TABLE grids (
    slide_id    INTEGER PRIMARY KEY REFERENCES slides(id) ON DELETE CASCADE,
    params_hash TEXT NOT NULL,
    target_mpp  REAL NOT NULL,
    tile_size   INTEGER NOT NULL,
    overlap     INTEGER NOT NULL,
    extent0     REAL NOT NULL,
    stride0     REAL NOT NULL,
    cols        INTEGER NOT NULL,
    rows        INTEGER NOT NULL,
    min_tissue  REAL NOT NULL
);
CREATE TABLE tiles (
    id             INTEGER PRIMARY KEY,
    slide_id       INTEGER NOT NULL REFERENCES slides(id) ON DELETE CASCADE,
    col            INTEGER NOT NULL,
    row            INTEGER NOT NULL,
    x              INTEGER NOT NULL,
    y              INTEGER NOT NULL,
    tissue         REAL NOT NULL,
    in_tissue      INTEGER NOT NULL,
    laplacian_var  REAL,
    saturated_frac REAL,
    white_frac     REAL,
    keep           INTEGER,
    UNIQUE (slide_id, col, row)
);
CREATE INDEX tiles_pending ON tiles (slide_id, in_tissue, laplacian_var);
CREATE TABLE steps (
    slide_id    INTEGER NOT NULL REFERENCES slides(id) ON DELETE CASCADE,
    step        TEXT NOT NULL,
    params_hash TEXT,
    params      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    error       TEXT,
    run_id      INTEGER REFERENCES runs(id),
    started     TEXT,
    finished    TEXT,
    PRIMARY KEY (slide_id, step)
);
CREATE TABLE runs (
    id       INTEGER PRIMARY KEY,
    command  TEXT NOT NULL,
    params   TEXT,
    versions TEXT,
    host     TEXT,
    pid      INTEGER,
    started  TEXT NOT NULL,
    ended    TEXT,
    outcome  TEXT
);
CREATE TABLE artifacts (
    id          INTEGER PRIMARY KEY,
    slide_id    INTEGER REFERENCES slides(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    path        TEXT NOT NULL UNIQUE,
    params_hash TEXT,
    created     TEXT NOT NULL,
    stale       INTEGER NOT NULL DEFAULT 0
);
"""

# MIGRATIONS[v] upgrades a manifest from version v to v + 1. Keep them additive (new tables, new
# nullable columns): a read-only workspace cannot be migrated, and is read at its own version from
# READ_ONLY_FROM on, the records taking a missing column as NULL.
READ_ONLY_FROM = 1
MIGRATIONS: dict[int, str] = {
    # Version 2: slides.warning, what `tile` found suspect in a slide it could tile (a coloured
    # background: YCbCr read as RGB), kept so every later run and step can still say it.
    1: "ALTER TABLE slides ADD COLUMN warning TEXT;",
    # Version 3: stain_fits, the stain normalisation fitted once per slide and step (`normalize`,
    # `translate:<model>` with --normalize-to): method, the slide's and the target's parameters.
    2: """CREATE TABLE IF NOT EXISTS stain_fits (
        slide_id INTEGER NOT NULL REFERENCES slides(id) ON DELETE CASCADE,
        step     TEXT NOT NULL,
        method   TEXT NOT NULL,
        params   TEXT NOT NULL,
        created  TEXT NOT NULL,
        PRIMARY KEY (slide_id, step));""",
    # Version 4: steps.code, a failure's kind (errors.LEFT_OUT, errors.NO_MPP, ...), so that
    # `status` tells a slide left out by design from a failed one, as the run's summary did.
    3: "ALTER TABLE steps ADD COLUMN code TEXT;",
}
