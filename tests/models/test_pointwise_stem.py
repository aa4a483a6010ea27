"""LiteMedSAM's pointwise stem and min-max input normalisation as configuration."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import espmedsam.models
from espmedsam.config import EncoderConfig, ModelConfig
from espmedsam.errors import ConfigError, InputError
from espmedsam.models.registry import build_model, tiny_config
from espmedsam.normalisation import normalise


def _tiny_pointwise() -> ModelConfig:
    config = tiny_config()
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, stem="pointwise"))


def test_litemedsam_stem_shapes_follow_from_the_config():
    model = build_model("litemedsam")
    stem = model.image_encoder.patch_embed.seq
    assert stem[0].c.weight.shape == (32, 3, 1, 1) and stem[2].c.weight.shape == (64, 32, 1, 1)
    assert model.config.encoder.output_stride == 4 and model.config.size_multiple == 8
    assert build_model("default").config.encoder.output_stride == 16


@pytest.mark.parametrize("size", [128, 256])
def test_litemedsam_model_output_shapes(size):
    model = build_model("litemedsam")
    with torch.inference_mode():
        out = model(torch.randn(1, 3, size, size), "fundus")
    assert out.embeddings.shape == (1, 256, size // 4, size // 4)
    assert out.patch_logits.shape == (1, 1, size // 8, size // 8)
    assert out.masks.shape == (1, 1, size, size)


@pytest.mark.parametrize("size", [128, 256, 512, 136])  # any multiple of 8 fits
def test_pointwise_stem_at_several_sizes(size):
    model = build_model(_tiny_pointwise())
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size), ["xray", "microscopy"])
    assert out.embeddings.shape == (2, 32, size // 4, size // 4)
    assert out.masks.shape == (2, 1, size, size)


def test_sizes_that_do_not_fit_are_refused():
    model = build_model(_tiny_pointwise())
    with pytest.raises(InputError, match="multiple of 8"):
        model(torch.randn(1, 3, 132, 132), "xray")
    with pytest.raises(ConfigError, match="stem must be one of"):
        EncoderConfig(stem="octagonal")
    with pytest.raises(ConfigError, match="image_size must be a positive multiple of 32"):
        ModelConfig(image_size=136)
    assert ModelConfig(image_size=136, encoder=EncoderConfig(stem="pointwise")).image_size == 136


def test_minmax_preprocess_scales_each_image_and_pads_with_zero():
    model = build_model("litemedsam")
    image = np.random.default_rng(0).integers(40, 200, (30, 60, 3), dtype=np.uint8)
    x, meta = model.preprocess(image, 64)
    valid = x[..., : meta.resized_size[0], : meta.resized_size[1]]
    assert valid.min() == 0.0 and valid.max() == pytest.approx(1.0)
    assert torch.all(x[..., meta.resized_size[0] :, :] == 0)
    flat = np.full((8, 8), 7, np.uint8)  # a constant image has no range: all zeros, no division by zero
    assert torch.all(model.preprocess(flat, 64)[0] == 0)


def test_normalise_modes():
    x = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(normalise(x, "mean_std", (10, 20, 30), (2, 2, 2)), torch.zeros_like(x))
    assert normalise(x, "minmax", (0,) * 3, (1,) * 3)[0, 2].max() == 1.0
    with pytest.raises(ConfigError, match="input normalisation"):
        normalise(x, "zscore", (0,) * 3, (1,) * 3)


def test_config_round_trip_keeps_stem_and_normalisation():
    config = build_model("litemedsam").config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_models_do_not_import_the_checkpoint_formats():
    """File formats live in checkpoints/, which imports models/; never the other way round."""
    models = Path(espmedsam.models.__file__).parent
    for source in models.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n.startswith("espmedsam.checkpoints") for n in names), source.name
