"""How core steps tell the caller what is happening, and what they return."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from stainctl.errors import LEFT_OUT, slide_hint


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    # `n` of the items counted in `start` need no work (already done): they leave the total,
    # so a rerun does not show "1/3" for a slide it only skipped.
    def drop(self, n: int = 1) -> None: ...
    # `warning`: a line about a slide whose result may be wrong (logged at WARNING level).
    def log(self, message: str, warning: bool = False) -> None: ...


class SilentProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def drop(self, n: int = 1) -> None:
        pass

    def log(self, message: str, warning: bool = False) -> None:
        pass


@dataclass
class SlideOutcome:
    slide: str  # workspace key, or the path when the slide never got one
    path: str
    state: str  # "done", "skipped" (already done, same parameters) or "failed"
    message: str = ""
    details: dict[str, object] = field(default_factory=dict)
    code: str | None = None  # a failure's kind (errors.HINTS gives its next step)

    @property
    def label(self) -> str:
        """The state as a person reads it: a slide the main job leaves out by design (not a
        brightfield H&E) is "left out", not "failed" (its exit status still counts it)."""
        return "left out" if self.state == "failed" and self.code == LEFT_OUT else self.state

    @property
    def warning(self) -> str | None:
        """What the slide's tiling found suspect (a coloured background), if anything."""
        value = self.details.get("warning")
        return None if value is None else str(value)

    def warn(self, warning: str | None) -> SlideOutcome:
        """Carry `warning` (SlideRecord.warning) in the details and the message, on every run:
        a rerun that skips the slide must still say its result may be wrong."""
        if warning:
            self.details["warning"] = warning
            self.message = f"{self.message}; warning: {warning}" if self.message else \
                f"warning: {warning}"
        return self


@dataclass
class BatchResult:
    step: str
    slides: list[SlideOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[SlideOutcome]:
        return [s for s in self.slides if s.state == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def as_dict(self) -> dict[str, object]:
        return {
            "step": self.step,
            "ok": not self.failed,
            # A failed slide's next step, as the summary gives it but as a sentence of its own
            # (errors.HINTS, said of one slide): the summary's fragment follows "N slide(s) ".
            "slides": [{**vars(s), "label": s.label,
                        **({"hint": slide_hint(s.code)} if s.state == "failed" else {})}
                       for s in self.slides],
        }


def params_hash(params: Mapping[str, object]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def unexpected(err: BaseException, where: object = None) -> str:
    """The reason recorded for an error no check anticipated; `where`: the folder the step
    writes in, named when the error names no file."""
    import errno

    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        target = err.filename or where
        return (f"disk full while writing{f' {target}' if target else ''}; free space and run "
                "again")
    return f"unexpected error ({type(err).__name__}: {err}); run again with -v for details"
