"""Training on a frozen, cached encoder prefix: controllers, the neck-side stages and the detail branch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from espmedsam.checkpoints.native import load_model
from espmedsam.config import apply_overrides
from espmedsam.errors import ConfigError
from espmedsam.models.registry import build_model, get_config
from espmedsam.train import train
from espmedsam.train.frozen import encoder_fingerprint
from espmedsam.train.loop import build_datasets, build_network, with_layout
from espmedsam.train.validate import forward_group


def test_cached_prefix_gives_the_uncached_loss(prefix_config, start):
    config = prefix_config(start)
    model = build_network(config)
    with torch.no_grad():  # perturb the fresh parts so the check covers them
        for name, p in model.named_parameters():
            if ".controllers." in name or "detail_branch" in name:
                p.add_(0.05 * torch.randn_like(p))
    train_set, _, _ = build_datasets(config, model)
    assert train_set.folder_variants == [2, 2]
    model.eval()
    item = train_set[0]
    group = {k: v[None] for k, v in item.items()}
    cached = forward_group(model, group).masks
    with torch.no_grad():
        whole = model(item["image"][None], item["modality"][None]).masks
    assert torch.allclose(cached, whole, atol=5e-3)  # the cached features are float16


def test_prefix_cache_is_keyed_by_the_prefix_alone(prefix_config, start):
    model = build_model(apply_overrides(get_config("tiny"), list(prefix_config(start).model_overrides)))
    before = encoder_fingerprint(model, 3)
    with torch.no_grad():
        model.image_encoder.layers[3].blocks[0].mlp.fc1.weight.add_(1.0)  # after the prefix
        model.image_encoder.neck[0].weight.add_(1.0)
    assert encoder_fingerprint(model, 3) == before
    with torch.no_grad():
        model.image_encoder.layers[2].blocks[0].mlp.fc1.weight.add_(1.0)  # inside it
    assert encoder_fingerprint(model, 3) != before
    assert encoder_fingerprint(model, 2) != encoder_fingerprint(model, 3)


def test_prefix_training_trains_controllers_and_decoder_only(prefix_config, start):
    config = prefix_config(start)
    result = train(config)
    first = load_model(start)
    trained = load_model(result.last_path)
    assert trained.config.controller.enabled and trained.config.detail.enabled
    before, after = first.state_dict(), trained.state_dict()
    shared = [k for k in before if k.startswith("image_encoder.")]
    assert all(torch.equal(before[k], after[k]) for k in shared)  # the shared encoder as loaded
    grown = [k for k in after if k not in before]
    assert any(".controllers." in k for k in grown) and any("detail_branch" in k for k in grown)
    fresh = build_network(config).state_dict()  # the grown parameters at their initial values
    assert any(not torch.equal(after[k], fresh[k]) for k in grown if ".controllers." in k)
    assert any(not torch.equal(after[k], fresh[k]) for k in grown if "detail_branch" in k)


def test_initial_weights_are_the_given_ones_and_the_schedule_restarts(prefix_config, start):
    config = prefix_config(start, warmup_steps=3)
    model = build_network(config)
    loaded = load_model(start).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.items())
    # a fresh detail branch and fresh adapters add nothing: the grown model gives the loaded one's masks
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        grown_out = model(x, ["dermoscopy", "dermoscopy"]).masks
        loaded_out = load_model(start)(x, ["dermoscopy", "dermoscopy"]).masks
    assert torch.allclose(grown_out, loaded_out, atol=0.05)  # only the new prompt tokens differ
    result = train(dataclasses.replace(config, epochs=1, steps_per_epoch=1))
    lr = [r["lr"] for r in _records(result.out_dir) if r.get("kind") == "train"]
    assert lr and lr[0] == pytest.approx(config.lr / config.warmup_steps)  # warm-up starts again


def test_model_overrides_may_only_add_parameters(start):
    model = load_model(start)
    with pytest.raises(ConfigError, match="only add parameters"):
        with_layout(model, ("decoder.upscale_dims=[8, 8]",))


def test_frozen_prefix_refuses_controllers_inside_it(prefix_config, start):
    config = dataclasses.replace(
        prefix_config(start),
        model_overrides=("controller.enabled=true", "controller.first_stage=1"),
    )
    with pytest.raises(ConfigError, match="first_stage"):
        build_network(config)


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
