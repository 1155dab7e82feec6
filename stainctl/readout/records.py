"""Typed records of a readout: a tile's (where it is, what it measured) and a slide's."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from stainctl.readout.measure import TileReadout


@dataclass(frozen=True, kw_only=True)
class TileRecord:
    """One tile's readout and where it is: level-0 origin and side (a square)."""

    x0: int
    y0: int
    extent0: float
    readout: TileReadout

    def to_json(self) -> dict[str, object]:
        # The fields, not asdict: the same keys and values (numbers, no nesting) without
        # asdict's recursive copy, for every tile's log line.
        r = self.readout
        return {"x0": self.x0, "y0": self.y0, "extent0": self.extent0,
                **{f.name: getattr(r, f.name) for f in fields(r)}}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> TileRecord:
        fields = {k: v for k, v in d.items() if k not in ("x0", "y0", "extent0")}
        return cls(x0=int(d["x0"]), y0=int(d["y0"]),  # type: ignore[call-overload]
                   extent0=float(d["extent0"]),  # type: ignore[arg-type]
                   readout=TileReadout(**fields))  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class SlideReadout:
    """A slide's readout: its tiles and their sum, with what the outputs need to draw them."""

    name: str
    path: Path
    marker: str
    mpp: float
    width0: int
    height0: int
    tiles: tuple[TileRecord, ...]
    total: TileReadout
    warning: str | None = None


def slide_row(slide: SlideReadout) -> dict[str, object]:
    """The slide's CSV row / JSON record (stable keys; units in the names)."""
    t = slide.total
    index = t.index
    per_mm2 = t.nuclei_per_mm2
    return {
        "slide": slide.name, "path": str(slide.path), "marker": slide.marker,
        "mpp_um": round(slide.mpp, 6), "tiles": len(slide.tiles),
        "tissue_mm2": round(t.tissue_um2 / 1e6, 6),
        "dab_positive_area_pct": round(100 * t.positive_fraction, 3),
        "h_score": round(t.h_score, 2),
        "weak_area_pct": round(_pct(t.weak_um2, t.tissue_um2), 3),
        "moderate_area_pct": round(_pct(t.moderate_um2, t.tissue_um2), 3),
        "strong_area_pct": round(_pct(t.strong_um2, t.tissue_um2), 3),
        "nuclei": t.nuclei, "positive_nuclei": t.positive_nuclei,
        "index_pct": None if index is None else round(100 * index, 3),
        "nuclei_per_mm2": None if per_mm2 is None else round(per_mm2, 1),
        "warning": slide.warning or "",
    }


def _pct(a: float, b: float) -> float:
    return 100 * a / b if b > 0 else 0.0


