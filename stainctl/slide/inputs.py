"""Turn the SLIDES arguments (paths, globs, directories, CSV lists) into slide requests."""

from __future__ import annotations

import csv
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from stainctl.errors import UsageError
from stainctl.slide.reader import SLIDE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideRequest:
    path: Path  # absolute, symbolic links kept: a slide is named after the path the user gave
    mpp: float | None = None  # an override from --mpp or the CSV
    error: str | None = None  # why this slide cannot be made (a bad CSV row): it fails alone


def _absolute(path: Path) -> Path:
    """Absolute and normalised, without resolving links (a batch of links to one file gives
    one slide per link, as the same links in a folder do)."""
    return Path(os.path.abspath(path))


def expand_slides(args: list[str], mpp: float | None = None) -> list[SlideRequest]:
    """Expand arguments in order, dropping duplicates. `mpp` applies where the CSV gives none."""
    found: dict[Path, SlideRequest] = {}
    for arg in args:
        for req in _expand_one(arg, mpp):
            first = found.setdefault(req.path, req)
            if first is req:
                continue
            # The errors name their own list and line: whether each has one is what must agree.
            if (first.mpp, first.error is None) != (req.mpp, req.error is None):
                # Which one wins would be a silent guess (two lists, or a list and the slide).
                raise UsageError(f"{req.path} is given twice with different pixel sizes "
                                 f"({_size(first)} and {_size(req)}); give each slide once")
            log.info("%s is given twice (%s); counted once", req.path, arg)
    if not found:
        raise UsageError(f"no slides found in: {' '.join(args)}")
    return list(found.values())


def _size(req: SlideRequest) -> str:
    if req.error is not None:
        return "an mpp that is not a number"
    return "its metadata's" if req.mpp is None else f"{req.mpp:g} µm/px"


def _expand_one(arg: str, mpp: float | None) -> list[SlideRequest]:
    path = Path(arg)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _read_csv(path, mpp)
    if path.is_dir():
        return [SlideRequest(p, mpp) for p in _walk(_absolute(path))]
    if path.exists():
        return [SlideRequest(_absolute(path), mpp)]
    if glob.has_magic(arg):
        matches = sorted(Path(p) for p in glob.glob(arg, recursive=True))
        return [SlideRequest(_absolute(p), mpp) for p in matches
                if (p.is_file() and _is_slide(p)) or (p.is_dir() and any(p.glob("*.dcm")))]
    # A missing path is reported as a failed slide, not a usage error, so the batch goes on.
    return [SlideRequest(_absolute(path), mpp)]


def _walk(folder: Path) -> list[Path]:
    """Slides under `folder`, recursively; a folder holding .dcm files is one DICOM slide."""
    if any(folder.glob("*.dcm")):
        return [folder]
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            out.extend(_walk(p))
        elif p.is_file() and _is_slide(p):
            out.append(p)
    return out


def _is_slide(path: Path) -> bool:
    # MRXS keeps its data in a sibling folder; only the .mrxs index is the slide.
    return path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")


def _read_csv(path: Path, default_mpp: float | None) -> list[SlideRequest]:
    """`path[,mpp]` rows, with or without a header; relative paths are relative to the CSV. A
    row with a bad mpp fails that slide only, named by the CSV's file and line number."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        # (line number where the row starts, row); line_num counts the lines read so far.
        rows: list[tuple[int, list[str]]] = []
        line = 1
        for r in reader:
            if r and r[0].strip() and not r[0].startswith("#"):
                rows.append((line, r))
            line = reader.line_num + 1
    if rows and rows[0][1][0].strip().lower() == "path":
        header = [h.strip().lower() for h in rows.pop(0)[1]]
        col_mpp = header.index("mpp") if "mpp" in header else None
    else:
        col_mpp = 1
    out = []
    # path -> (line, mpp text, what it reads as): a path listed twice must agree with itself,
    # else which row wins would be a silent guess.
    seen: dict[Path, tuple[int, str, object]] = {}
    for n, row in rows:
        given = Path(row[0].strip())
        p = given if given.is_absolute() else path.parent / given
        value = row[col_mpp].strip() if col_mpp is not None and len(row) > col_mpp else ""
        row_mpp, error = default_mpp, None
        meaning: object = row_mpp  # what the mpp text reads as: a number, or the bad text
        try:
            row_mpp = meaning = float(value) if value else default_mpp
        except ValueError:
            meaning = value
            error = (f"{path}, line {n}: mpp {value!r} is not a number; correct it (e.g. 0.25) "
                     "or leave it empty to use the slide's metadata")
        if not os.path.lexists(p) and given.exists() and not given.is_absolute():
            # Written relative to the current folder: "no such file" alone hid why.
            error = (f"{path}, line {n}: {given} is read relative to the list's folder "
                     f"({_absolute(path.parent)}), where it does not exist; write it relative "
                     f"to that folder or as {_absolute(given)}")
        key = _absolute(p)
        if key in seen:
            first_line, first_value, first_meaning = seen[key]
            if first_meaning != meaning:
                raise UsageError(
                    f"{path}: {key} is listed twice with different pixel sizes: mpp "
                    f"{first_value!r} (line {first_line}) and {value!r} (line {n}); keep one "
                    "row per slide")
            # The same slide with the same mpp: one row is enough, said so that a count of
            # slides one short of the rows is not a mystery.
            log.info("%s, line %d: %s repeats line %d; counted once", path, n, key, first_line)
            continue
        seen[key] = (n, value, meaning)
        out.append(SlideRequest(key, row_mpp, error))
    return out
