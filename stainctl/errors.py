"""Errors that carry a message meant for the person running stainctl.

Core code raises these; the CLI prints the message (no traceback) and picks the exit code.
"""


class StainctlError(Exception):
    """Base class: `str(err)` is a complete sentence naming the object and the fix."""


class UsageError(StainctlError):
    """The command cannot run as asked (exit code 2)."""


class WorkspaceLocked(UsageError):
    """Another process is writing to the workspace."""


class SlideError(StainctlError):
    """One slide cannot be processed; the batch goes on with the others. `code` names a kind of
    failure whose way out is not "run again" (NO_MPP), so the summary can give that instead."""

    def __init__(self, path: object, reason: str, code: str | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.code = code


NO_MPP = "no-mpp"  # the slide has no pixel size: --mpp or a CSV mpp column is the fix


class ModelError(UsageError):
    """A model cannot be used as asked: unknown, weights missing or gated, bad card (exit 2)."""
