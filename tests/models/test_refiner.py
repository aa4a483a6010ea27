from __future__ import annotations

import dataclasses

import torch

from espmedsam.config import RefinerConfig
from espmedsam.models.refiner import EmbeddingRefiner
from espmedsam.models.registry import build_model, tiny_config


def test_fresh_refiner_is_the_identity_and_learns_spatial_context():
    refiner = EmbeddingRefiner(8, depth=2, kernel_size=3)
    x = torch.randn(2, 8, 10, 10)
    assert torch.equal(refiner(x), x)
    torch.nn.init.normal_(refiner[0].pwconv2.weight)
    y = refiner(x)
    bumped = x.clone()
    bumped[:, :, 5, 5] += 1.0  # one position changes its neighbours' outputs once trained
    assert not torch.allclose(refiner(bumped)[:, :, 5, 6], y[:, :, 5, 6])


def test_refiner_depth_comes_from_the_config():
    assert len(build_model("tiny").refiner) == 0
    config = dataclasses.replace(tiny_config(), refiner=RefinerConfig(depth=3, kernel_size=5))
    model = build_model(config)
    assert len(model.refiner) == 3 and model.refiner[0].dwconv.kernel_size == (5, 5)
    out = model(torch.randn(1, 3, 64, 64), "xray")
    assert out.masks.shape == (1, 1, 64, 64)
    assert len(build_model("litemedsam").refiner) == 2
