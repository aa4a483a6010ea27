from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from espmedsam.checkpoints.native import load_model, load_unet, save_model
from espmedsam.config import TrainConfig
from espmedsam.errors import CheckpointError, ConfigError
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.unet import UNetBaseline
from espmedsam.train import TrainProgress, train
from espmedsam.train.loop import build_network, with_layout


def _records(run_dir, kind):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_writes_checkpoints_log_and_config(tiny_config):
    seen: list[TrainProgress] = []
    result = train(tiny_config, progress=seen.append)
    out = tiny_config.run_dir
    assert result.steps == 4 and not result.stopped_early
    assert [p.step for p in seen] == [1, 2, 3, 4] and seen[-1].val_dice is not None
    assert set(result.val_dice) == {"derm", "fundus"}
    assert 0.0 <= result.best_dice <= 1.0 and result.best_step in (2, 4)
    best = load_model(result.best_path)
    assert isinstance(best, ESPMedSAM) and best.config.name == "tiny" and best.config.image_size == 64
    assert isinstance(load_model(result.last_path), ESPMedSAM)
    state = torch.load(result.state_path, weights_only=True)
    assert state["step"] == 4
    assert TrainConfig.from_yaml(out / "config.yaml") == tiny_config
    train_records, val_records = _records(out, "train"), _records(out, "val")
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert {"loss", "dice_loss", "focal_loss", "patch_loss", "lr", "images_per_s"} <= set(train_records[0])
    assert "teacher_loss" not in train_records[0]  # no teacher, no teacher term
    assert [r["step"] for r in val_records] == [2, 4]
    if pytest.importorskip("matplotlib"):
        assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def progress(p: TrainProgress) -> None:
        if p.step == step:
            raise _Interrupt

    return progress


def test_resume_is_bitwise_exact(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, bf16=False, checkpoint_every=1, num_workers=0)
    whole = train(dataclasses.replace(config, out_dir=str(tmp_path / "whole")))
    parted = dataclasses.replace(config, out_dir=str(tmp_path / "parted"))
    with pytest.raises(_Interrupt):
        train(parted, progress=_stop_at(3))  # mid-epoch, after the checkpoint of step 3
    resumed = train(parted, resume=True)
    a, b = (torch.load(r.state_path, weights_only=True) for r in (whole, resumed))
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), (key, name)
    assert a["scheduler"] == b["scheduler"]
    assert (resumed.best_dice, resumed.best_step, resumed.val_dice) == (
        whole.best_dice,
        whole.best_step,
        whole.val_dice,
    )
    losses = [[r["loss"] for r in _records(r.out_dir, "train")] for r in (whole, resumed)]
    assert losses[0] == losses[1]


def test_resume_rejects_a_changed_config(tiny_config):
    train(dataclasses.replace(tiny_config, epochs=1))
    with pytest.raises(ConfigError, match="lr changed"):
        train(dataclasses.replace(tiny_config, epochs=1, lr=1e-2), resume=True)


def test_resume_without_state_fails(tiny_config):
    with pytest.raises(CheckpointError, match="state.pt"):
        train(tiny_config, resume=True)


def test_time_budget_stops_cleanly(tiny_config):
    result = train(dataclasses.replace(tiny_config, time_budget_minutes=1e-9, checkpoint_every=1))
    assert result.stopped_early and result.steps == 1
    assert result.state_path.is_file() and result.last_path.is_file() and result.best_path.is_file()
    state = torch.load(result.state_path, weights_only=True)
    assert state["counters"]["best_dice"] == result.best_dice and state["counters"]["val_step"] == 1
    assert [r["step"] for r in _records(tiny_config.run_dir, "val")] == [1]


def test_absent_modalities_are_not_updated(tiny_config):
    derm_only = dataclasses.replace(tiny_config, data=tiny_config.data[:1], epochs=1)
    initial = build_network(derm_only).state_dict()
    trained = load_model(train(derm_only).last_path).state_dict()
    # dermoscopy is modality 0; every other controller and hypernetwork keeps its initial weights
    per_modality = [k for k in initial if ".controllers." in k or "hypernetworks_mlps." in k]
    others = [k for k in per_modality if ".controllers.0." not in k and "hypernetworks_mlps.0." not in k]
    assert others and all(torch.equal(initial[k], trained[k]) for k in others)
    own = [k for k in initial if ".controllers.0.prompt_tokens" in k]
    assert any(not torch.equal(initial[k], trained[k]) for k in own)


def test_unet_baseline_trains_in_the_same_loop(tiny_config):
    config = dataclasses.replace(tiny_config, arch="unet", unet_features=(4, 4, 8, 8, 16, 4), epochs=1)
    result = train(config)
    assert result.steps == 2
    model = load_unet(result.best_path)
    assert isinstance(model, UNetBaseline) and model.config.features == (4, 4, 8, 8, 16, 4)
    assert all(r["patch_loss"] == 0.0 for r in _records(config.run_dir, "train"))


def test_resume_keeps_the_runs_layout_when_the_init_file_gains_a_part(tiny_config, tmp_path):
    start = save_model(build_network(tiny_config), tmp_path / "start.safetensors")
    config = dataclasses.replace(
        tiny_config, model="default", init=str(start), bf16=False, checkpoint_every=1, num_workers=0
    )
    whole = train(dataclasses.replace(config, out_dir=str(tmp_path / "whole")))
    parted = dataclasses.replace(config, out_dir=str(tmp_path / "parted"))
    with pytest.raises(_Interrupt):
        train(parted, progress=_stop_at(3))
    save_model(with_layout(load_model(start), ("detail.enabled=true",)), start)  # e.g. a new bundled file
    resumed = train(parted, resume=True)
    a, b = (torch.load(r.state_path, weights_only=True) for r in (whole, resumed))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert len(load_model(resumed.last_path).lineage) == len(load_model(whole.last_path).lineage) == 1


def test_init_starts_from_a_native_checkpoint(tiny_config, tmp_path):
    start = build_network(tiny_config)
    path = save_model(start, tmp_path / "start.safetensors")
    config = dataclasses.replace(tiny_config, model="default", init=str(path), epochs=1, image_size=32)
    result = train(config)
    trained = load_model(result.last_path)
    assert trained.config.name == "tiny" and trained.config.image_size == 32


def test_no_data_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="data"):
        train(dataclasses.replace(tiny_config, data=()))
