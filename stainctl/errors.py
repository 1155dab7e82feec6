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
    """One slide cannot be processed; the batch goes on with the others."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelError(UsageError):
    """A model cannot be used as asked: unknown, weights missing or gated, bad card (exit 2)."""
