"""`--marker`: a model's name or a stain, resolved by one rule a user can predict, and a
message that says what to type when it cannot be resolved."""

from __future__ import annotations

from pathlib import Path

import pytest
from models_helpers import FAST_CARD

from stainctl.errors import ModelError
from stainctl.models.lookup import marker_card, suggestions


def card(directory: Path, name: str, marker: str, *, weights: bool = True) -> None:
    """A user's marker model; its weight file exists (installed) unless `weights` is False."""
    (directory / name).mkdir(parents=True)
    (directory / name / "card.toml").write_text(FAST_CARD.format(name=name, marker=marker))
    if weights:
        (directory / name / "generator.safetensors").write_bytes(b"not read here")


def test_a_misspelt_name_gets_the_nearest_model_names(use_models):
    directory = use_models()
    assert suggestions("mist_her2", ["pixcell-mist-her2", "pixcell-her2match", "demo-ki67"]) \
        == ["pixcell-mist-her2"]
    with pytest.raises(ModelError, match="did you mean pixcell-mist-her2"):
        marker_card("mist_her2", directory)
    with pytest.raises(ModelError, match="did you mean demo-ki67"):
        marker_card("demo-ki76", directory)
    with pytest.raises(ModelError) as err:  # nothing near: no guess, the list of what there is
        marker_card("ck7", directory)
    assert "did you mean" not in str(err.value) and "demo-ki67 (ki67)" in str(err.value)


def test_a_stain_several_models_make_is_not_guessed(use_models):
    directory = use_models()
    with pytest.raises(ModelError) as err:  # both shipped her2 models, neither installed
        marker_card("her2", directory)
    assert "several models make 'her2'" in str(err.value)
    assert "pixcell-her2match" in str(err.value) and "pixcell-mist-her2" in str(err.value)
    assert "--marker NAME" in str(err.value)

    card(directory, "her2-site-a", "her2")
    card(directory, "her2-site-b", "her2")
    with pytest.raises(ModelError) as err:  # two installed: the user must say which
        marker_card("HER2", directory)
    assert "several installed models make 'HER2'" in str(err.value)
    assert "her2-site-a (her2)" in str(err.value) and "her2-site-b (her2)" in str(err.value)
    assert marker_card("her2-site-b", directory).name == "her2-site-b"  # a name always works


def test_a_stain_one_installed_model_makes_is_that_model(use_models):
    directory = use_models()
    # Only the shipped demo is installed (pixcell-mist-ki67 also makes ki67, not pulled).
    assert marker_card("ki67", directory).name == "demo-ki67"
    # The user's own model beats the shipped demonstration; an uninstalled one does not count.
    card(directory, "ki67-site", "ki67")
    card(directory, "ki67-draft", "ki67", weights=False)
    assert marker_card("ki67", directory).name == "ki67-site"
    # One model makes the stain but is not installed: it is used, so that the missing-weights
    # message says what to pull. (PR is made by two shipped cards since histdist-pr.)
    card(directory, "ck7-draft", "ck7", weights=False)
    assert marker_card("ck7", directory).name == "ck7-draft"
    with pytest.raises(ModelError, match=r"several models make 'pr'.*histdist-pr, pixcell-mist-pr"):
        marker_card("pr", directory)


def test_the_other_makers_of_a_stain_are_named_as_installed_or_to_pull(use_models, caplog):
    # "using demo-ki67 (also made by histdist-ki67, pixcell-mist-ki67)" read as if those were
    # ready to use: neither has its weights here.
    directory = use_models()
    card(directory, "ki67-site", "ki67")
    with caplog.at_level("INFO", logger="stainctl.models.lookup"):
        assert marker_card("ki67", directory).name == "ki67-site"
    [line] = [r.getMessage() for r in caplog.records if "also made by" in r.getMessage()]
    assert "demo-ki67 (installed)" in line
    assert "histdist-ki67, pixcell-mist-ki67 once pulled with `stainctl models pull NAME`" in line


def test_a_model_that_is_no_marker_model_says_so(use_models):
    with pytest.raises(ModelError, match="uni2-h is an encoder model, not a marker model"):
        marker_card("uni2-h", use_models())


@pytest.mark.parametrize("args, message", [
    (["--marker", "mist_her2"], "did you mean pixcell-mist-her2"),
    (["--marker", "her2"], "several models make 'her2'"),
    (["--format", "tif"], "'--format'"),
])
def test_main_job_usage_error_leaves_no_empty_workspace(cli, tmp_path, use_models, args,
                                                        message, cmu1_path):
    use_models()
    out = tmp_path / "out"
    r = cli("translate", cmu1_path, "-o", out, *args)
    assert r.exit_code == 2 and message in r.stderr + r.stdout
    assert not out.exists()


def test_main_job_with_no_slides_found_leaves_no_empty_workspace(cli, tmp_path, use_models):
    use_models()
    out = tmp_path / "runs" / "out"
    (tmp_path / "runs").mkdir()
    r = cli("translate", f"{tmp_path}/scans/*.svs", "-o", out)
    assert r.exit_code == 2 and "no slides found" in r.stderr
    assert not out.exists() and (tmp_path / "runs").is_dir()  # what was there stays
