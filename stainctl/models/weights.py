"""Finding, fetching, checking and loading weight files.

Resolution order for each file of a card: its explicit local path, the models directory
(`<dir>/<model>/[<subfolder>/]<file name>`), the Hugging Face hub cache (HF_HUB_CACHE, else
HF_HOME/hub). Nothing
is downloaded except by `pull`, so every other command works offline and fails at once, with a
message naming the model, the file and the command that gets it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stainctl.errors import ModelError
from stainctl.models.card import ModelCard, WeightFile


@dataclass(frozen=True)
class Resolved:
    weight: WeightFile
    path: Path | None  # None: not installed
    where: str  # "card path", "models dir", "hub cache" or why it is missing


def hub_cache() -> Path:
    """The hub cache as huggingface_hub defines it, read now (its own constant is read once, at
    import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def locate(card: ModelCard, weight: WeightFile, directory: Path) -> Resolved:
    if weight.path:
        path = Path(weight.path).expanduser()
        if not path.is_absolute() and card.origin is not None:
            path = card.origin.parent / path
        if path.is_file():
            return Resolved(weight, path, "card path")
        return Resolved(weight, None, f"the card's path {path} does not exist")
    local = local_path(card, weight, directory)
    if local.is_file():
        return Resolved(weight, local, "models dir")
    cached = _from_hub_cache(weight) if weight.repo else None
    if cached is not None:
        return Resolved(weight, cached, "hub cache")
    return Resolved(weight, None, "not downloaded")


def local_path(card: ModelCard, weight: WeightFile, directory: Path) -> Path:
    """Where a hub file goes in the models directory: `<dir>/<model>/[<subfolder>/]<name>` (the
    subfolder keeps apart files of one name, such as a transformer's and a VAE's
    diffusion_pytorch_model.safetensors)."""
    folder = directory / card.name
    if weight.subfolder:
        folder = folder / weight.subfolder
    return folder / Path(weight.filename).name


def resolve(card: ModelCard, role: str, directory: Path, *, verify: bool = True) -> Path:
    """The local file of a card's weights, or a ModelError saying how to get it."""
    found = locate(card, card.weight(role), directory)
    if found.path is None:
        raise ModelError(missing_message(card, found, directory))
    if verify and found.weight.sha256:
        check_sha256(found.path, found.weight.sha256, card.name)
    return found.path


def check_installed(cards: list[ModelCard], directory: Path, *, verify: bool = False) -> None:
    """One ModelError listing every weight file of `cards` that is not installed; with `verify`,
    then the checksums the cards give (the check before a long job: a corrupt file is found
    before any slide is touched, not after tiling and filtering)."""
    found = [(c, locate(c, w, directory)) for c in cards for w in c.weights]
    missing = [missing_message(c, f, directory) for c, f in found if f.path is None]
    if missing:
        raise ModelError("\n".join(missing))
    if verify:
        for c, f in found:
            if f.path is not None and f.weight.sha256:
                check_sha256(f.path, f.weight.sha256, c.name)


def missing_message(card: ModelCard, found: Resolved, directory: Path) -> str:
    w = found.weight
    if w.path:
        return (f"model {card.name}: its {w.role} weights are missing ({found.where}); fix the "
                f"path in {card.origin}")
    if w.url and not w.repo:
        return (f"model {card.name}: its {w.role} ({w.source}) is not installed; its authors "
                f"publish it at {w.url}, not on the Hugging Face hub: download the model folder "
                f"and run `stainctl models add FOLDER --for {card.name}`")
    how = f"run `stainctl models pull {card.name}`"
    if w.gated:
        how += (f" after accepting the licence at https://huggingface.co/{w.repo} and setting "
                "HF_TOKEN to a token of that account")
    return (f"model {card.name}: the {w.role} weights {w.source} are not installed; {how}, or "
            f"put the file at {local_path(card, w, directory)}")


def _from_hub_cache(weight: WeightFile) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(weight.repo, weight.filename, subfolder=weight.subfolder or None,
                               revision=weight.revision, cache_dir=hub_cache(),
                               local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None
    return Path(str(path))


def pull(card: ModelCard, directory: Path) -> list[Resolved]:
    """Download what is missing into the hub cache (HF_TOKEN is used for gated repositories)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    out = []
    for weight in card.weights:
        found = locate(card, weight, directory)
        if found.path is None and weight.url and not weight.repo:
            raise ModelError(missing_message(card, found, directory))
        if found.path is None and not weight.path:
            try:
                path = hf_hub_download(weight.repo, weight.filename,
                                       subfolder=weight.subfolder or None,
                                       revision=weight.revision, cache_dir=hub_cache())
            except GatedRepoError:
                raise ModelError(
                    f"model {card.name}: {weight.repo} is gated; accept its licence at "
                    f"https://huggingface.co/{weight.repo} and set HF_TOKEN to a token of that "
                    "account, then pull again") from None
            except RepositoryNotFoundError:
                raise ModelError(f"model {card.name}: the hub has no repository {weight.repo} "
                                 "(or it is private: set HF_TOKEN)") from None
            except (LocalEntryNotFoundError, OSError) as err:
                raise ModelError(
                    f"model {card.name}: could not download {weight.source} ({err}); check the "
                    "network and HF_HUB_OFFLINE, or copy the file to "
                    f"{local_path(card, weight, directory)}") from None
            found = Resolved(weight, Path(str(path)), "hub cache")
        if found.path is not None and weight.sha256:
            check_sha256(found.path, weight.sha256, card.name)
        out.append(found)
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Files already found sound in this process, by (path, size, mtime): the early check and the
# engine's own `resolve` do not hash a multi-GB file twice.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def check_sha256(path: Path, expected: str, model: str) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected.lower())
    if key in _VERIFIED:
        return
    actual = sha256_of(path)
    if actual == expected.lower():
        _VERIFIED.add(key)
    else:
        raise ModelError(f"model {model}: {path} has sha256 {actual}, the card expects "
                         f"{expected}; the file is corrupt or another version: delete it and "
                         "pull again")


def load_state_dict(path: Path) -> dict[str, Any]:
    """Tensors from safetensors, or from a PyTorch file without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of many kinds: one message
        raise ModelError(f"{path} is not a loadable weights file ({_torch_reason(err)}); only "
                         "safetensors and plain PyTorch state dicts (tensors only) are accepted:"
                         " save `model.state_dict()`, or convert it with safetensors' "
                         "`save_file`") from None
    for key in ("state_dict", "model_state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _torch_reason(err: BaseException) -> str:
    """torch's first sentence of why, without its advice to load with weights_only=False (which
    runs the file's code: stainctl never does)."""
    text = str(err).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("WeightsUnpickler error:"):
                # Only the first sentence: torch goes on to advise allow-listing the class.
                what = line.split(":", 1)[1].split(". ")[0].strip().rstrip(".")
                return f"it holds pickled Python objects, not only tensors: {what}"
        return "it holds pickled Python objects, not only tensors"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def check_weight_file(path: Path) -> None:
    """Load `path` as stainctl would (safetensors, or a state dict without unpickling), so a file
    that every later use would refuse is refused when it is added."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as err:
            raise ModelError(f"{path} is not a readable safetensors file ({err})") from None
        return
    load_state_dict(path)
