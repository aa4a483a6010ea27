from __future__ import annotations

import pytest
import torch

from espmedsam import build_model


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    return build_model("tiny")


@pytest.fixture(scope="session")
def default_model():
    return build_model("default")
