"""Shared fixtures. Real data comes from ../shared/data beside the checkout (as in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stainctl.models.torch_compat import prepare_torchvision

# Before any test imports timm or torchvision (NOTES.md: its CUDA build cannot load on CPU torch).
prepare_torchvision()

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CMU1 = DATA / "wsi" / "aperio" / "CMU-1-Small-Region.svs"
NDPI_DAPI = DATA / "wsi" / "hamamatsu" / "test3-DAPI-2-387.ndpi"
OME_HE = DATA / "tiles" / "he" / "OS-1-detail_HE.ome.tif"
OME_KI67 = [DATA / "tiles" / "ihc" / "OS-2-ndpi_Ki67.ome.tif",
            DATA / "tiles" / "ihc" / "OS-2-vsi_Ki67.ome.tif"]
PNG_IHC = DATA / "tiles" / "ihc" / "skimage_ihc_FHL2-DAB_colon.png"


@pytest.fixture(scope="session", autouse=True)
def _real_data_present() -> None:
    assert CMU1.exists(), f"real test data missing: expected {DATA} beside the checkout"


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from stainctl.cli.app import app

    runner = CliRunner()

    def invoke(*args: object, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


@pytest.fixture
def use_models(tmp_path, monkeypatch):
    """`use_models(install)`: a fresh models directory filled by `install(directory)`, made the
    user's (STAINCTL_MODELS), with the hub offline; returns the directory."""

    def use(install=None) -> Path:
        directory = tmp_path / "models"
        if install is not None:
            install(directory)
        monkeypatch.setenv("STAINCTL_MODELS", str(directory))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return directory

    return use
