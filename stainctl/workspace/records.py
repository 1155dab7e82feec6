"""Typed manifest records: what `Manifest` methods return instead of raw `sqlite3.Row`s.

One frozen dataclass per table, with the table's column names as field names, so a record reads
`slide.key` and a typo is a type error. Coordinates are level-0 pixels, top-left.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

from stainctl.errors import LEFT_OUT

StepState = Literal["running", "done", "failed"]
STEP_STATES: tuple[StepState, ...] = ("running", "done", "failed")

@dataclass(frozen=True, kw_only=True)
class SlideRecord:
    """A registered slide. Its description (backend ... objective power) is None until `tile`
    has opened it."""

    id: int
    key: str  # unique in the workspace: names its folder and its outputs
    path: str  # as given (resolved), the slide's identity
    fingerprint: str
    backend: str | None = None
    vendor: str | None = None
    width: int | None = None  # level-0 pixels
    height: int | None = None
    levels: str | None = None  # JSON: level dimensions and downsamples
    mpp: float | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    added: str = ""
    warning: str | None = None  # what `tile` found suspect (e.g. a coloured background)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SlideRecord:
        c = row
        return cls(
            id=int(row["id"]), key=str(row["key"]), path=str(row["path"]),
            fingerprint=str(row["fingerprint"]), backend=_str(c["backend"]),
            vendor=_str(c["vendor"]), width=_int(c["width"]), height=_int(c["height"]),
            levels=_str(c["levels"]), mpp=_float(c["mpp"]), mpp_source=_str(c["mpp_source"]),
            objective_power=_float(c["objective_power"]), added=str(row["added"]),
            # Absent in a schema-1 manifest read as it is (read-only). `in` on a Row tests its
            # values, not its column names, hence keys().
            warning=_str(c["warning"]) if "warning" in c.keys() else None)  # noqa: SIM118


@dataclass(frozen=True, kw_only=True)
class GridRecord:
    """A slide's tile grid: tiles of `tile_size` px at `target_mpp`, `extent0` level-0 px wide,
    `stride0` level-0 px apart."""

    slide_id: int
    params_hash: str  # of the tile step's parameters that laid it
    target_mpp: float
    tile_size: int
    overlap: int
    extent0: float
    stride0: float
    cols: int
    rows: int
    min_tissue: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> GridRecord:
        return cls(
            slide_id=int(row["slide_id"]), params_hash=str(row["params_hash"]),
            target_mpp=float(row["target_mpp"]), tile_size=int(row["tile_size"]),
            overlap=int(row["overlap"]), extent0=float(row["extent0"]),
            stride0=float(row["stride0"]), cols=int(row["cols"]), rows=int(row["rows"]),
            min_tissue=float(row["min_tissue"]))

    def values(self) -> tuple[object, ...]:
        """Column values in field order, for the INSERT."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, kw_only=True)
class TileCell:
    """A grid tile as `tile` lays it, before it has a manifest id."""

    col: int
    row: int
    x: int  # level-0 top-left
    y: int
    tissue: float  # tissue fraction on the thumbnail mask
    in_tissue: bool


@dataclass(frozen=True, kw_only=True)
class TileRecord:
    """A grid tile. Ids grow in raster order (row by row, then column), so id order is raster
    order. Filter metrics are None until measured; `keep` is None until judged."""

    id: int
    slide_id: int
    col: int
    row: int
    x: int
    y: int
    tissue: float
    in_tissue: bool
    laplacian_var: float | None = None
    saturated_frac: float | None = None
    white_frac: float | None = None
    keep: bool | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TileRecord:
        c = row
        return cls(
            id=int(row["id"]), slide_id=int(row["slide_id"]), col=int(row["col"]),
            row=int(row["row"]), x=int(row["x"]), y=int(row["y"]),
            tissue=float(row["tissue"]), in_tissue=bool(row["in_tissue"]),
            laplacian_var=_float(c["laplacian_var"]), saturated_frac=_float(c["saturated_frac"]),
            white_frac=_float(c["white_frac"]),
            keep=None if c["keep"] is None else bool(c["keep"]))


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """Where one slide stands in one step (`tile`, `filter`, `embed:<encoder>`,
    `translate:<model>`, `stitch:<marker>`)."""

    slide_id: int
    step: str
    state: StepState
    params_hash: str | None = None
    params: Mapping[str, object] | None = None
    error: str | None = None
    code: str | None = None  # a failure's kind (errors.LEFT_OUT, ...); None for older runs
    run_id: int | None = None
    started: str | None = None
    finished: str | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"

    def done_with(self, params_hash: str) -> bool:
        """Done, and with these parameters: nothing to redo."""
        return self.state == "done" and self.params_hash == params_hash

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StepRecord:
        c = row
        state = str(row["state"])
        if state not in STEP_STATES:  # the schema's CHECK makes this unreachable
            raise ValueError(f"unknown step state {state!r}")
        params = json.loads(str(c["params"])) if c["params"] is not None else None
        return cls(
            slide_id=int(row["slide_id"]), step=str(row["step"]),
            state=state,
            params_hash=_str(c["params_hash"]),
            params=params if isinstance(params, dict) else None, error=_str(c["error"]),
            code=_str(c["code"]) if "code" in c.keys() else None,  # noqa: SIM118
            run_id=_int(c["run_id"]), started=_str(c["started"]), finished=_str(c["finished"]))


@dataclass(frozen=True, kw_only=True)
class StainFitRecord:
    """A stain normalisation fitted once for one slide in one step: the method, and the slide's
    (`source`) and the reference's (`target`) parameters (stain matrix and maximum
    concentrations for Macenko, Lab mean and spread for Reinhard; JSON numbers)."""

    slide_id: int
    step: str
    method: str
    source: Mapping[str, object]
    target: Mapping[str, object]
    created: str = ""

    def __post_init__(self) -> None:
        if not self.method:
            raise ValueError("a stain fit needs its method")

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StainFitRecord:
        params = json.loads(str(row["params"]))
        return cls(slide_id=int(row["slide_id"]), step=str(row["step"]),
                   method=str(row["method"]), source=dict(params.get("source", {})),
                   target=dict(params.get("target", {})), created=str(row["created"]))

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "source": dict(self.source),
                "target": dict(self.target)}


@dataclass(frozen=True, kw_only=True)
class ArtifactRecord:
    """A file made for a slide (or for the workspace when `slide_id` is None). `path` is
    relative to the workspace when inside it. `stale`: made from a grid since replaced."""

    id: int
    slide_id: int | None
    kind: str
    path: str
    params_hash: str | None
    created: str
    stale: bool

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ArtifactRecord:
        c = row
        return cls(
            id=int(row["id"]), slide_id=_int(c["slide_id"]), kind=str(row["kind"]),
            path=str(row["path"]), params_hash=_str(c["params_hash"]),
            created=str(row["created"]), stale=bool(row["stale"]))


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One command run on the workspace; `outcome` is None while it runs (or if it was
    killed), else 'ok', 'partial', 'interrupted' or 'error: ...'."""

    id: int
    command: str
    params: Mapping[str, object]
    versions: Mapping[str, str]
    host: str | None
    pid: int | None
    started: str
    ended: str | None
    outcome: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        c = row
        params = json.loads(str(c["params"])) if c["params"] is not None else {}
        versions = json.loads(str(c["versions"])) if c["versions"] is not None else {}
        return cls(
            id=int(row["id"]), command=str(row["command"]),
            params=params if isinstance(params, dict) else {},
            versions={str(k): str(v) for k, v in versions.items()}
            if isinstance(versions, dict) else {},
            host=_str(c["host"]), pid=_int(c["pid"]), started=str(row["started"]),
            ended=_str(c["ended"]), outcome=_str(c["outcome"]))


@dataclass(frozen=True, kw_only=True)
class SlideSummary:
    """What `status` shows for one slide."""

    slide: str
    path: str
    mpp: float | None
    tiles_total: int
    tiles_tissue: int
    tiles_measured: int
    tiles_kept: int
    steps: Mapping[str, str]  # a StepState, or "interrupted": left running by a dead run
    last_done: str | None
    errors: Mapping[str, str | None]
    codes: Mapping[str, str] = field(default_factory=dict)  # the failed steps' kinds
    warning: str | None = None  # what `tile` found suspect (SlideRecord.warning)
    # The stain normalisation fitted for the slide, per step (StainFitRecord.as_dict()).
    stain_fits: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def left_out(self) -> bool:
        """Its only failures are the main job leaving it out by design (a fluorescence
        slide): nothing to fix, as the run's summary said."""
        return bool(self.errors) and all(self.codes.get(step) == LEFT_OUT
                                         for step in self.errors)

    def as_dict(self) -> dict[str, object]:
        return {"slide": self.slide, "path": self.path, "mpp": self.mpp,
                "tiles_total": self.tiles_total, "tiles_tissue": self.tiles_tissue,
                "tiles_measured": self.tiles_measured, "tiles_kept": self.tiles_kept,
                "steps": dict(self.steps), "last_done": self.last_done,
                "errors": dict(self.errors), "codes": dict(self.codes),
                "left_out": self.left_out, "warning": self.warning,
                "stain_fits": {k: dict(v) for k, v in self.stain_fits.items()}}


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: int | None) -> int | None:
    return None if value is None else int(value)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)
