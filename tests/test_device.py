from __future__ import annotations

import pytest
import torch

from espmedsam.device import resolve_device
from espmedsam.errors import ConfigError
from espmedsam.predict import Predictor


def test_auto_picks_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "tpu"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device(name)


def test_predictor_defaults_to_auto(tiny_model):
    assert Predictor(tiny_model).device.type == resolve_device("auto").type
