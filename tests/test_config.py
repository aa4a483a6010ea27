from __future__ import annotations

import pytest

from espmedsam.config import ModelConfig
from espmedsam.errors import ConfigError
from espmedsam.models.registry import CONFIGS, get_config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dict_json_yaml_round_trip(name, tmp_path):
    config = get_config(name)
    assert ModelConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "model.yaml"
    path.write_text(config.to_yaml())
    assert ModelConfig.from_yaml(path) == config


def test_missing_fields_take_defaults():
    config = ModelConfig.from_dict({"encoder": {"depths": [1, 1, 1, 1]}})
    assert config.encoder.depths == (1, 1, 1, 1)
    assert config.encoder.embed_dims == ModelConfig().encoder.embed_dims


@pytest.mark.parametrize(
    "data, message",
    [
        ({"encoder": {"depth": [1]}}, "encoder.depth"),
        ({"decoder": {"num_heads": "eight"}}, "decoder.num_heads"),
        ({"image_size": 100}, "multiple of 32"),
        ({"encoder": [1, 2]}, "encoder must be a mapping"),
        ({"modalities": "xray"}, "modalities must be a list"),
    ],
)
def test_bad_config_names_its_key(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model 'huge'"):
        get_config("huge")


@pytest.mark.parametrize(
    "encoder, message",
    [
        ({"depths": [1, 1, 1]}, "depths \\(3\\)"),
        ({"merge_strides": [2, 2]}, "merge_strides \\(2\\)"),
        ({"num_heads": [3, 4, 5, 10]}, "does not divide"),
    ],
)
def test_inconsistent_encoder_config(encoder, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({"encoder": encoder})
