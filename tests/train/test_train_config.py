from __future__ import annotations

import pytest

from espmedsam.config import LossConfig, TrainConfig, apply_overrides, load_train_config
from espmedsam.errors import ConfigError


def test_defaults_round_trip_through_yaml(tmp_path):
    config = TrainConfig(data=("a:fundus", "b"), time_budget_minutes=90.0, init="x.safetensors")
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    assert TrainConfig(name="x").run_dir.as_posix() == "runs/x"


def test_overrides_parse_values_as_yaml():
    config = apply_overrides(
        TrainConfig(),
        ["lr=1e-4", "loss.patch_weight=0.3", "bf16=false", "data=[a:fundus, b]", "time_budget_minutes=null"],
    )
    assert config.lr == 1e-4 and config.loss == LossConfig(patch_weight=0.3) and config.bf16 is False
    assert config.data == ("a:fundus", "b") and config.time_budget_minutes is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.nope=1", "unknown config key 'loss.nope'"),
        ("learning_rate=1", "unknown config key 'learning_rate'"),
        ("model.image_size=256", "unknown config key 'model.image_size'"),
        ("lr", "must look like key=value"),
        ("batch_size=eight", "batch_size must be int"),
        ("loss.dice_weight=[1]", "loss.dice_weight must be float"),
        ("arch=vnet", "arch must be one of espmedsam, unet"),
        ("image_size=100", "multiple of 32"),
        ("steps_per_epoch=0", "steps_per_epoch must be at least 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(TrainConfig(), [override])


def test_recipes_load_by_name_and_path():
    recipe = load_train_config("six_datasets_256", ["epochs=1"])
    assert recipe.arch == "espmedsam" and len(recipe.data) == 6 and recipe.epochs == 1
    assert recipe.data[0] == "data/isic2017:dermoscopy" and recipe.image_size == 256
    unet = load_train_config("unet_six_datasets_256")
    assert unet.arch == "unet" and unet.data == recipe.data and unet.total_steps == 11 * recipe.total_steps
    assert load_train_config(None) == TrainConfig()


def test_zoom_recipe_continues_the_first_phase_within_two_hours():
    first, second = load_train_config("six_datasets_256"), load_train_config("six_datasets_256_zoom")
    assert second.init == str(first.run_dir / "last.safetensors") and second.data == first.data
    assert second.zoom_probability > 0 and second.time_budget_minutes <= 120 - 82


def test_unknown_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="six_datasets_256"):
        load_train_config("nope")
    with pytest.raises(ConfigError, match="neither a file"):
        load_train_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: 1\nlosses: {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'losses'"):
        load_train_config(tmp_path / "bad.yaml")


def test_litemedsam_recipe_trains_eight_sets_on_a_frozen_encoder():
    config = load_train_config("six_datasets_litemedsam")
    assert config.frozen_encoder and config.variants >= 1 and config.init == "litemedsam.safetensors"
    assert len(config.data) == 8 and len(config.input_sizes) == 6
    assert all(size % 8 == 0 for size in config.input_sizes)
    # the cache build and the decoder training together stay within the 150-minute budget
    assert config.time_budget_minutes <= 90


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variants": 0}, "variants must be at least 1"),
        ({"input_sizes": (192, 100)}, "input_sizes must be positive multiples of 8"),
        ({"frozen_encoder": True, "arch": "unet"}, "frozen_encoder and frozen_prefix need arch: espmedsam"),
    ],
)
def test_frozen_encoder_fields_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)
