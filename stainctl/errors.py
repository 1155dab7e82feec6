"""Errors that carry a message meant for the person running stainctl.

Core code raises these; the CLI prints the message (no traceback) and picks the exit code.
"""

from typing import NamedTuple


class StainctlError(Exception):
    """Base class: `str(err)` is a complete sentence naming the object and the fix."""


class UsageError(StainctlError):
    """The command cannot run as asked (exit code 2)."""


class WorkspaceLocked(UsageError):
    """Another process is writing to the workspace."""


# Kinds of slide failure. Each has its own next step (HINTS), so the summary after a batch says
# what to do about the slides that failed instead of one "fix it and run again" for all.
NO_MPP = "no-mpp"  # the slide has no pixel size: a CSV mpp column (or --mpp) is the fix
MISSING = "missing"  # the path cannot be reached
UNSUPPORTED = "unsupported"  # a format stainctl does not read
CORRUPT = "corrupt"  # truncated or damaged: copy it again
NO_TISSUE = "no-tissue"
DARK = "dark"  # fluorescence or dark-field, refused by `tile` (--allow-dark takes it)
LEFT_OUT = "left-out"  # fluorescence or dark-field in the main job: nothing to fix

class Hint(NamedTuple):
    """A kind of failure's next step, said of many slides (after "N slide(s) " in a batch's
    summary) or of one (a failed slide's `hint` in --json, read on its own)."""

    many: str  # follows "N slide(s) "
    one: str  # a sentence's start about one slide
    step: str  # what to do, for one slide or many
    joint: str = ": "

    def of_many(self) -> str:
        return f"{self.many}{self.joint}{self.step}"

    def of_one(self) -> str:
        return f"{self.one}{self.joint}{self.step}"


HINTS: dict[str | None, Hint] = {
    NO_MPP: Hint(
        "have no pixel size in their metadata", "The slide has no pixel size in its metadata",
        "give each such slide its pixel size in a CSV slide list with an `mpp` column "
        "(`path,mpp` rows), or add --mpp MICRONS_PER_PIXEL only when every slide of the command "
        "lacks one or has that size (--mpp overrides the pixel size of every slide of the "
        "command); then run it again, finished work is skipped."),
    MISSING: Hint(
        "failed: the file cannot be reached", "The file cannot be reached",
        "check the path (a typo, an unmounted drive, a broken link) and run the same command "
        "again: finished work is skipped.", joint="; "),
    UNSUPPORTED: Hint(
        "are in a format stainctl does not read",
        "The slide is in a format stainctl does not read",
        "convert each such file to a pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`) or "
        "leave it out of the command."),
    CORRUPT: Hint(
        "are truncated or corrupt", "The file is truncated or corrupt",
        "copy the file again from its source (compare its size), then run the same command "
        "again: finished work is skipped."),
    NO_TISSUE: Hint(
        "have no tissue found", "No tissue was found on the slide",
        "check the slide (is it the right one?), or lower --min-tissue / --tissue-threshold and "
        "run the same command again."),
    DARK: Hint(
        "look like fluorescence or dark-field slides",
        "The slide looks like a fluorescence or dark-field slide",
        "a slide that is brightfield after all needs --allow-dark; add it and run the same "
        "command again."),
    LEFT_OUT: Hint(
        "were left out as not brightfield H&E (fluorescence or dark-field)",
        "The slide was left out as not brightfield H&E (fluorescence or dark-field)",
        "nothing to fix, a virtual IHC slide is made from a brightfield H&E slide."),
    None: Hint(
        "failed", "The slide failed",
        "fix the cause shown above (the slide's message) and run the same command again: "
        "finished work is skipped."),
}


class SlideError(StainctlError):
    """One slide cannot be processed; the batch goes on with the others. `code` names the kind
    of failure (NO_MPP, CORRUPT, ...), whose next step the summary gives (`hint`). `str(err)`
    names the file once, whether or not `reason` already starts with it."""

    def __init__(self, path: object, reason: str, code: str | None = None) -> None:
        # A reason may name the file itself (one a summary lists under the slide's key).
        super().__init__(reason if reason.startswith(f"{path}: ") else f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.code = code


def hint(code: str | None) -> str:
    """The next step for a failure of kind `code` (the generic one for an unknown kind), to
    follow "N slide(s) " in a summary."""
    return HINTS.get(code, HINTS[None]).of_many()


def slide_hint(code: str | None) -> str:
    """The next step for one slide's failure of kind `code`, as a sentence of its own."""
    return HINTS.get(code, HINTS[None]).of_one()


class ModelError(UsageError):
    """A model cannot be used as asked: unknown, weights missing or gated, bad card (exit 2)."""
