"""Model cards: what a model is, what it needs, where its weights come from, what it is for.

A card is a TOML (or JSON) file. Cards for public models ship in `stainctl/models/cards/`; a user's
own cards live in the models directory (`--models-dir`, env STAINCTL_MODELS).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError

# base: a generator to adapt (PixCell-1024); classifier: IHC pattern classes from H&E tokens
# (an align model, `train-align` / `predict`); normaliser: a learned stain normaliser (StainFuser)
KINDS = ("encoder", "marker", "base", "classifier", "normaliser")


@dataclass(frozen=True)
class WeightFile:
    """One file of weights: a local path, or a file of a Hugging Face hub repository."""

    role: str  # what it is for: "encoder", "transformer", "vae", "lora", "flow_mlp", ...
    filename: str = ""  # in the hub repository
    repo: str = ""  # hub repository id, e.g. "MahmoodLab/UNI2-h"
    revision: str = "main"
    subfolder: str = ""
    sha256: str = ""  # verified when given
    gated: bool = False  # the hub repository asks users to accept its licence first
    path: str = ""  # local file; relative paths are relative to the card
    # Where the authors publish a file outside the hub (HistDiST's models): never downloaded by
    # stainctl; the file is looked for in the models directory (`models add FOLDER`).
    url: str = ""

    @property
    def source(self) -> str:
        if self.path:
            return self.path
        if self.url and not self.repo:
            sub = f"{self.subfolder}/" if self.subfolder else ""
            return f"{sub}{self.filename} ({self.url})"
        sub = f"{self.subfolder}/" if self.subfolder else ""
        return f"hf://{self.repo}/{sub}{self.filename}@{self.revision}"


@dataclass(frozen=True)
class ModelCard:
    name: str
    kind: str  # "encoder", "marker" or "base"
    engine: str  # how it runs: "timm" (encoders), "pixcell", "fast"
    input_mpp: float  # µm/px of the tiles it takes
    tile_size: int  # px a side of the tiles it takes, at input_mpp
    licence: str
    intended_use: str
    training_data: str
    description: str = ""
    marker: str = ""  # the stain a marker model makes, e.g. "her2"
    encoder: str = ""  # the card name of the encoder a marker model is conditioned on
    architecture: dict[str, Any] = field(default_factory=dict)  # engine build parameters
    weights: tuple[WeightFile, ...] = ()
    origin: Path | None = None  # the card file
    metrics: dict[str, Any] = field(default_factory=dict)  # how it measured up, from training

    def weight(self, role: str) -> WeightFile:
        for w in self.weights:
            if w.role == role:
                return w
        raise ModelError(f"model {self.name} has no {role!r} weights in its card {self.origin}")

    def to_toml(self) -> str:
        """The card as TOML that `load_card` reads back to an equal card (fields left at their
        defaults are left out; `origin` is where it is written, so it is not stored)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("architecture", "metrics", "weights", "origin") or value == f.default:
                continue
            lines.append(f"{_toml_key(f.name)} = {_toml_value(value)}")
        if self.architecture:
            _toml_table("architecture", self.architecture, lines)
        if self.metrics:
            _toml_table("metrics", self.metrics, lines)
        for w in self.weights:
            lines += ["", "[[weights]]"]
            lines += [f"{_toml_key(f.name)} = {_toml_value(getattr(w, f.name))}"
                      for f in fields(w)
                      if f.name == "role" or getattr(w, f.name) != f.default]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        out["origin"] = str(self.origin) if self.origin else None
        out["weights"] = [vars(w) for w in self.weights]
        return out


def write_card(card: ModelCard, path: Path) -> Path:
    """`card` as TOML at `path`, written under a temporary name and renamed into place; a card
    that its own reader would refuse is not written."""
    from stainctl.workspace.atomic import atomic_path

    text = card.to_toml()
    card_from_dict(tomllib.loads(text), path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise ModelError(f"a model card cannot hold {type(value).__name__} values ({value!r})")


def _toml_table(name: str, table: dict[str, Any], lines: list[str]) -> None:
    """`[name]` with its plain values, then its sub-tables as `[name.key]`."""
    lines += ["", f"[{name}]"]
    subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()
              if k not in subtables]
    for key, sub in subtables.items():
        _toml_table(f"{name}.{_toml_key(key)}", sub, lines)


def load_card(path: str | Path) -> ModelCard:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ModelError(f"no model card at {path}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not a valid model card: {err}") from None
    return card_from_dict(data, path)


def card_from_dict(data: dict[str, Any], origin: Path | None = None) -> ModelCard:
    where = origin or "the model card"
    data = dict(data)
    raw_weights = data.pop("weights", [])
    known = {f.name for f in fields(ModelCard)} - {"weights", "origin"}
    unknown = set(data) - known
    if unknown:
        raise ModelError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        weights = tuple(WeightFile(**w) for w in raw_weights)
        card = ModelCard(**data, weights=weights, origin=origin)
    except TypeError as err:
        raise ModelError(f"{where}: {err}") from None
    _validate(card, where)
    return card


# A model name becomes part of file names (`<slide>.<name>.ome.tiff`, `<name>.zarr`) and a
# manifest step name; a '.' would make those ambiguous, so one rule, checked wherever a name enters.
NAME_RULE = "a model name may hold letters, digits, '-' and '_' only"


def valid_name(name: str) -> bool:
    return bool(name) and name.isascii() and name.replace("-", "").replace("_", "").isalnum()


def _validate(card: ModelCard, where: object) -> None:
    if card.kind not in KINDS:
        raise ModelError(f"{where}: kind must be one of {', '.join(KINDS)}, got {card.kind!r}")
    if not valid_name(card.name):
        raise ModelError(f"{where}: {NAME_RULE}, got {card.name!r}")
    if card.input_mpp <= 0 or card.tile_size < 16:
        raise ModelError(f"{where}: input_mpp must be positive and tile_size at least 16")
    if card.kind == "marker" and not card.marker:
        raise ModelError(f"{where}: a marker model must name its marker")
    for w in card.weights:
        if not w.path and not ((w.repo or w.url) and w.filename):
            raise ModelError(f"{where}: weights {w.role!r} need a local path or a hub repo "
                             "(or a publisher's url) and filename")
        if w.sha256 and len(w.sha256) != 64:
            raise ModelError(f"{where}: weights {w.role!r}: sha256 must be 64 hex digits")
