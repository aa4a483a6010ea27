from __future__ import annotations

import math

import pytest

from espmedsam import build_model
from espmedsam.config import TrainConfig
from espmedsam.train.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


def test_warmup_then_cosine_to_the_floor():
    factor = dict(warmup_steps=10, total_steps=110, schedule="cosine", min_ratio=0.01)
    assert lr_factor(0, **factor) == pytest.approx(0.1)
    assert lr_factor(9, **factor) == pytest.approx(1.0)
    assert lr_factor(10, **factor) == pytest.approx(1.0)
    assert lr_factor(60, **factor) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(110, **factor) == pytest.approx(0.01)
    assert lr_factor(500, **factor) == pytest.approx(0.01)
    assert lr_factor(50, warmup_steps=0, total_steps=100, schedule="constant", min_ratio=0.01) == 1.0


def test_scheduler_follows_the_factor():
    config = TrainConfig(epochs=1, steps_per_epoch=20, warmup_steps=5, lr=1e-3)
    optimizer = build_optimizer(build_model("tiny"), config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 14 / 15))))


def test_norms_biases_and_tokens_get_no_weight_decay():
    model = build_model("tiny")
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(n.endswith("prompt_tokens") for n in no_decay_names)
    assert "decoder.mask_query.weight" in no_decay_names
    assert all(n.endswith(".weight") for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(names)
