from __future__ import annotations

import importlib.util
import json
import logging
import random

import numpy as np
import pytest
import torch

from espmedsam.errors import CheckpointError
from espmedsam.train.history import History
from espmedsam.train.state import load_state, restore_rng, rng_state, save_state


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    save_state(tmp_path / "state.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(load_state(tmp_path / "state.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_state_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state(tmp_path / "junk.pt")


def _train_record(step: int) -> dict:
    keys = ("loss", "dice_loss", "focal_loss", "patch_loss")
    return {"kind": "train", "step": step, **dict.fromkeys(keys, 1.0 / step)}


def test_resumed_history_drops_records_after_the_checkpoint(tmp_path):
    history = History(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        history.append(_train_record(step))
    resumed = History(tmp_path / "log.jsonl", resume_step=2)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2] == [r["step"] for r in resumed.records]
    assert History(tmp_path / "log.jsonl").records == []


def test_resumed_history_drops_a_line_cut_short_by_a_kill(tmp_path):
    history = History(tmp_path / "log.jsonl")
    history.append(_train_record(1))
    with (tmp_path / "log.jsonl").open("a") as file:
        file.write('{"kind": "train", "step": 2, "lo')  # killed while appending
    resumed = History(tmp_path / "log.jsonl", resume_step=5)
    assert [r["step"] for r in resumed.records] == [1]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 1


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = History(tmp_path / "log.jsonl")
    history.append(_train_record(1))
    history.append({"kind": "val", "step": 1, "val_dice": {"a": 0.5, "b": 0.7}, "val_mean_dice": 0.6})
    assert history.plot(tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_plot_is_skipped_with_one_log_line_without_matplotlib(tmp_path, monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "matplotlib" else real(n))
    history = History(tmp_path / "log.jsonl")
    history.append(_train_record(1))
    with caplog.at_level(logging.INFO, logger="espmedsam.train.history"):
        assert history.plot(tmp_path / "curves.png") is None
        assert history.plot(tmp_path / "curves.png") is None
    assert len([r for r in caplog.records if "matplotlib" in r.message]) == 1
    assert not (tmp_path / "curves.png").exists()
