"""Where model cards are found: the cards shipped with stainctl, then the user's models directory.

The models directory holds one folder per added model (`<dir>/<name>/card.toml` and its weight
files). It is `--models-dir`, else $STAINCTL_MODELS, else ~/.local/share/stainctl/models.
A user's card with the name of a shipped one overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

from stainctl.errors import ModelError
from stainctl.models.card import ModelCard, load_card

SHIPPED = Path(__file__).parent / "cards"


def models_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("STAINCTL_MODELS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "stainctl" / "models"


def all_cards(directory: Path | None = None) -> dict[str, ModelCard]:
    cards = {}
    for path in sorted(SHIPPED.glob("*.toml")):
        card = load_card(path)
        cards[card.name] = card
    directory = directory or models_dir()
    if directory.is_dir():
        for path in sorted([*directory.glob("*/card.toml"), *directory.glob("*/card.json")]):
            card = load_card(path)
            cards[card.name] = card
    return cards


def get_card(name: str, directory: Path | None = None) -> ModelCard:
    """A card by name, or a card file given by path."""
    if name.endswith((".toml", ".json")) and Path(name).is_file():
        return load_card(name)
    cards = all_cards(directory)
    if name not in cards:
        known = ", ".join(sorted(cards))
        raise ModelError(f"unknown model {name!r}; known models: {known}. "
                         "Add your own with `stainctl models add CARD.toml`")
    return cards[name]


def required_cards(card: ModelCard, directory: Path | None = None) -> list[ModelCard]:
    """The card and every card it runs with, each once: its `base` (an adapted model's), the
    card it takes its flow MLP from (`flow_from`), its encoder, and theirs in turn."""
    seen: dict[str, ModelCard] = {}

    def visit(c: ModelCard) -> None:
        if c.name in seen:
            return
        seen[c.name] = c
        for key in ("base", "flow_from"):  # a base brings its own encoder
            if c.architecture.get(key):
                visit(get_card(str(c.architecture[key]), directory))
        if c.encoder:
            visit(get_card(c.encoder, directory))

    visit(card)
    return list(seen.values())


def install(card_file: Path, files: list[Path], directory: Path) -> Path:
    """Copy a card and its weight files into `<directory>/<name>/`, where translate finds it;
    returns the installed card."""
    import shutil

    from stainctl.models.weights import check_weight_file
    from stainctl.workspace.atomic import atomic_path

    card = load_card(card_file)  # refuse a bad card before copying anything
    for f in files:  # and weights that every later use would refuse
        check_weight_file(f)
    target = directory / card.name
    for f in files:
        with atomic_path(target / f.name) as tmp:
            shutil.copyfile(f, tmp)
    with atomic_path(target / f"card{card_file.suffix}") as tmp:
        shutil.copyfile(card_file, tmp)
    return target / f"card{card_file.suffix}"


def install_folder(folder: Path, card_name: str | None, directory: Path) -> Path:
    """Copy a model folder (a HistDiST pipeline folder, as its authors publish them) into
    `<directory>/<name>/`, where the card's weights are looked for. The card is the folder's own
    `card.toml`, or the known card `card_name` (`--for histdist-er`). Returns the target."""
    import os
    import shutil

    own = next((folder / n for n in ("card.toml", "card.json") if (folder / n).is_file()), None)
    if own is not None:
        card = load_card(own)
        if card_name and card_name != card.name:
            raise ModelError(f"{own} is the card of {card.name}, not {card_name}")
    elif card_name:
        card = get_card(card_name, directory)
    else:
        raise ModelError(f"{folder} has no card.toml: say which model it is, e.g. "
                         "`stainctl models add FOLDER --for histdist-er`")
    if card.engine == "histdist":
        from stainctl.engines.histdist.folder import check_folder

        check_folder(folder, card.name)
    target = directory / card.name
    tmp = directory / f".{card.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, tmp)  # copied whole under a temporary name, then renamed
    if target.exists():
        old = directory / f".{card.name}.old-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return target
