"""Shared fixtures. Real data comes from ../shared/data beside the checkout (as in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stainctl.models.torch_compat import prepare_torchvision

# Before any test imports timm or torchvision (docs/NOTES.md: its CUDA build cannot load on CPU
# torch).
prepare_torchvision()

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CMU1 = DATA / "wsi" / "aperio" / "CMU-1-Small-Region.svs"
NDPI_DAPI = DATA / "wsi" / "hamamatsu" / "test3-DAPI-2-387.ndpi"
OME_HE = DATA / "tiles" / "he" / "OS-1-detail_HE.ome.tif"
OME_KI67 = [DATA / "tiles" / "ihc" / "OS-2-ndpi_Ki67.ome.tif",
            DATA / "tiles" / "ihc" / "OS-2-vsi_Ki67.ome.tif"]
PNG_IHC = DATA / "tiles" / "ihc" / "skimage_ihc_FHL2-DAB_colon.png"


def free_port() -> int:
    """A local TCP port nothing listens on (once this returns): an unreachable scheduler."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _real_data_present() -> None:
    assert CMU1.exists(), f"real test data missing: expected {DATA} beside the checkout"


# The real slides and images as fixtures, for tests to ask for by name. The constants above
# stay for what runs at collection time (parametrize lists) and for helper modules.
@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data: the real slides, tiles and paired sets."""
    return DATA


@pytest.fixture(scope="session")
def cmu1_path() -> Path:
    """CMU-1-Small-Region.svs: a small Aperio H&E slide (0.499 µm/px, 2220 x 2967 px)."""
    return CMU1


@pytest.fixture(scope="session")
def dapi_path() -> Path:
    """A Hamamatsu NDPI fluorescence (DAPI) slide: dark background, refused as H&E."""
    return NDPI_DAPI


@pytest.fixture(scope="session")
def he_ome_path() -> Path:
    """An H&E OME-TIFF that OpenSlide refuses and tiffslide reads."""
    return OME_HE


@pytest.fixture(scope="session")
def ki67_ome_paths() -> list[Path]:
    """Two Ki67 IHC OME-TIFFs (from an NDPI and a VSI scan)."""
    return list(OME_KI67)


@pytest.fixture(scope="session")
def ihc_png_path() -> Path:
    """A DAB IHC PNG without a pixel size (scikit-image's FHL2 colon image)."""
    return PNG_IHC


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
