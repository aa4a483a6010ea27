"""One server for the web tests: the bundled model behind the app, in a thread on a free loopback port."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from espmedsam.checkpoints.native import default_checkpoint, load_checkpoint  # noqa: E402
from espmedsam.predict import EXAMPLES_DIR, Predictor  # noqa: E402
from espmedsam.serve.app import create_app  # noqa: E402
from espmedsam.serve.server import background_server  # noqa: E402
from espmedsam.serve.uploads import UploadLimits  # noqa: E402

# small caps, so that the tests can go over them cheaply
TEST_LIMITS = UploadLimits(max_bytes=2 * 2**20, max_pixels=2000 * 2000, max_frames=64)


@pytest.fixture(scope="session")
def predictor() -> Predictor:
    return Predictor(load_checkpoint(default_checkpoint()))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-workspace")


@pytest.fixture(scope="session")
def app(predictor, workspace):
    return create_app(predictor, limits=TEST_LIMITS, checkpoint_name="default", workspace=workspace)


@pytest.fixture(scope="session")
def live_url(app) -> str:
    with background_server(app) as url:
        yield url


@pytest.fixture(scope="session")
def page_url(predictor, tmp_path_factory) -> str:
    """The page as a user meets it: the default limits (its text shows them)."""
    workspace = tmp_path_factory.mktemp("page-workspace")
    app = create_app(predictor, checkpoint_name="default", workspace=workspace)
    with background_server(app) as url:
        yield url


@pytest.fixture(scope="session")
def example() -> Path:
    """A bundled example whose file name says its modality."""
    return EXAMPLES_DIR / "dermoscopy_isic17_test_0007.jpg"
