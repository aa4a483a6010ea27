"""Training and distillation on two CPU processes (gloo) through the real entry point,
``python -m torch.distributed.run --standalone --nproc_per_node=2 -m espmedsam ...``, against one process
on the same global batch.

Tolerance: the two runs take their float sums in another order (means over each rank's share, then over
the ranks; batch-norm statistics combined from the shares), so their gradients differ at rounding level
(relative 3e-5 here, as much as a one-process run on 2 threads differs from one on 1). AdamW divides each
gradient entry by its own running magnitude, so an entry whose gradient is rounding noise (zero in exact
arithmetic, such as an attention key bias) may move by up to lr per step either way. Hence: logged losses
agree to 1e-4 (relative), the weight update to 2 % (norm of the difference over the norm of the update;
measured 0.3 %, and 82 % without synchronised batch norm), and 99.5 % of the weights to 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.checkpoints.sam import save_sam_encoder
from espmedsam.config import DistillConfig, TrainConfig
from espmedsam.distill.images import list_images
from espmedsam.distill.mmdkd import distill
from espmedsam.distill.teacher import load_teacher
from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder
from espmedsam.train import distributed, train
from espmedsam.train.loop import build_network
from espmedsam.train.state import load_state
from espmedsam.train.sync_batchnorm import SyncBatchNorm2d, sync_batchnorm

RUN_FILES = {"best.safetensors", "config.yaml", "curves.png", "last.safetensors", "log.jsonl", "state.pt"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``espmedsam ARGS`` on two processes; --standalone lets torchrun pick a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "-m", "espmedsam", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_close_weights(
    expected: dict, got: dict, start: dict, *, update: float, exact: float, stats: float = 1e-4
) -> None:
    """The update from ``start`` agrees to ``update`` (relative norm), and a share ``exact`` of the
    weights to 1e-5; batch-norm statistics to ``stats`` (absolute)."""
    trained = [k for k in expected if expected[k].is_floating_point() and "running_" not in k]

    def flat(state: dict) -> torch.Tensor:
        return torch.cat([state[k].flatten().double() for k in trained])

    difference = flat(got) - flat(expected)
    assert difference.norm() <= update * (flat(expected) - flat(start)).norm()
    assert (difference.abs() <= 1e-5).double().mean() >= exact
    for key in (k for k in expected if "running_" in k):
        assert torch.allclose(got[key], expected[key], atol=stats), key


def _assert_close_losses(expected: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]  # one line per step: rank 0 logs
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "dice_loss", "focal_loss", "patch_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, datasets) -> dict:
    """A one-process run in this process, and the same config on two processes (CLI, torchrun)."""
    base = tmp_path_factory.mktemp("ddp")
    config = TrainConfig(
        name="ddp", model="tiny", data=datasets, image_size=64, batch_size=4, epochs=2, steps_per_epoch=2,
        warmup_steps=1, checkpoint_every=2, log_every=1, bf16=False, out_dir=str(base / "one"),
    )  # fmt: skip
    train(config)
    path = base / "two.yaml"
    path.write_text(dataclasses.replace(config, out_dir=str(base / "two")).to_yaml())
    done = _torchrun("train", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"config": config, "yaml": path, "one": base / "one", "two": base / "two", "output": done.stderr}


def test_two_processes_train_like_one_on_the_global_batch(runs):
    one, two = runs["one"], runs["two"]
    start = build_network(runs["config"]).state_dict()
    a, b = load_state(one / "state.pt"), load_state(two / "state.pt")
    assert b["step"] == 4
    _assert_close_weights(a["model"], b["model"], start, update=0.02, exact=0.995)
    _assert_close_losses(_records(one, "train"), _records(two, "train"))
    for x, y in zip(_records(one, "val"), _records(two, "val"), strict=True):
        assert x["step"] == y["step"] and y["val_dice"] == pytest.approx(x["val_dice"], abs=1e-4)
    # the modalities in no share keep their initial weights exactly (None gradients on every rank)
    modalities = build_network(runs["config"]).modalities
    present = {str(modalities.index(m)) for m in ("dermoscopy", "fundus")}
    slots = {k: re.search(r"(?:controllers|hypernetworks_mlps)\.(\d+)\.", k) for k in start}
    absent = [k for k, slot in slots.items() if slot and slot.group(1) not in present]
    assert absent and all(torch.equal(start[k], b["model"][k]) for k in absent)


def test_only_rank_zero_writes_and_reports(runs):
    two = runs["two"]
    assert {p.name for p in two.iterdir()} == RUN_FILES
    lines = (two / "log.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == len((runs["one"] / "log.jsonl").read_text().splitlines())
    assert runs["output"].count("4 steps; val Dice") == 1


def test_resume_under_torchrun_continues_to_the_same_result(runs, tmp_path):
    path = tmp_path / "parted.yaml"
    out = tmp_path / "parted"
    parted = dataclasses.replace(runs["config"], out_dir=str(out), time_budget_minutes=1e-9)
    path.write_text(parted.to_yaml())
    done = _torchrun("train", "--config", str(path))  # both ranks stop after step 1: rank 0's clock
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 steps (time budget spent)" in done.stderr and load_state(out / "state.pt")["step"] == 1
    done = _torchrun("train", "--config", str(path), "--resume", "--set", "time_budget_minutes=null")
    assert done.returncode == 0, done.stderr[-3000:]
    whole, resumed = load_state(runs["two"] / "state.pt"), load_state(out / "state.pt")
    for key in whole["model"]:  # same processes, same reduction order: bit for bit
        assert torch.equal(whole["model"][key], resumed["model"][key]), key
    for index, moments in whole["optimizer"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(tensor, resumed["optimizer"]["state"][index][name]), (index, name)
    losses = [[r["loss"] for r in _records(d, "train")] for d in (runs["two"], out)]
    assert losses[0] == losses[1]


def test_per_process_batch_norm_when_sync_batchnorm_is_off(runs, tmp_path):
    out = tmp_path / "unsynced"
    args = ["--config", str(runs["yaml"]), "--set", "sync_batchnorm=false", "--set", f"out_dir={out}"]
    done = _torchrun("train", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    synced, unsynced = load_state(runs["two"] / "state.pt")["model"], load_state(out / "state.pt")["model"]
    statistics = [k for k in synced if k.endswith(".running_var")]
    # each process normalised by its own half of the batch: other statistics than the global batch's
    assert statistics and any(not torch.allclose(synced[k], unsynced[k]) for k in statistics)


def test_a_batch_the_processes_do_not_divide_is_a_one_line_error(runs, tmp_path):
    out = tmp_path / "odd"
    args = ["--config", str(runs["yaml"]), "--set", "batch_size=3", "--set", f"out_dir={out}"]
    done = _torchrun("train", *args)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "batch_size 3" in errors[0] and "2 processes" in errors[0], done.stderr
    assert not out.exists()


def test_distillation_on_two_processes_follows_one(tmp_path):
    """The common stage (batch norm in train mode, synchronised) on 5 training images in batches of 4:
    the last batch of 1 leaves one rank a zero-image share. The two ranks fill their own teacher cache."""
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (48 + 4 * i, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    torch.manual_seed(1)
    teacher = save_sam_encoder(SamViTEncoder(SamViTConfig.tiny()), tmp_path / "teacher.safetensors")
    torch.manual_seed(0)
    student = save_model(build_model("tiny"), tmp_path / "student.safetensors")
    settings = {"image_size": 64, "epochs": 2, "batch_size": 4, "lr": 1e-3, "held_out": 0.3, "bf16": False}
    config = DistillConfig(**settings, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "one"))
    one = distill(load_model(student), load_teacher(teacher), list_images(images), config, stage="common")
    overrides = {**settings, "cache_dir": tmp_path / "cache2"}
    sets = [part for key, value in overrides.items() for part in ("--set", f"{key}={value}")]
    args = ["distill", "common", "-t", str(teacher), "-i", str(images), "--student", str(student), *sets]
    done = _torchrun(*args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("teacher embedded 7 inputs") == 1  # the ranks' shares, reported by rank 0
    written = {p.name for p in (tmp_path / "two").iterdir()}
    assert written == {"curves.png", "log.jsonl", "student.safetensors"}
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for a, b in zip(one.records, records, strict=True):
        assert b["held_out_mse"] == pytest.approx(a["held_out_mse"], rel=1e-4)
    start, expected = load_model(student).state_dict(), load_model(one.student_path).state_dict()
    got = load_model(tmp_path / "two" / "student.safetensors").state_dict()
    _assert_close_weights(expected, got, start, update=0.05, exact=0.99, stats=1e-3)


def test_shares_split_a_batch_in_order(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # read from torchrun's variables before any group exists
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(distributed.share(list(range(7))))
    assert shares == [[0, 1], [2, 3], [4, 5, 6]]
    assert distributed.strided_share(list(range(7))) == [2, 5]
    monkeypatch.setenv("RANK", "0")
    assert distributed.share([1]) == [] and distributed.is_main() and not distributed.is_distributed()


def test_sync_batchnorm_is_batchnorm_outside_a_process_group():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    reference.load_state_dict(model.state_dict())
    undo = sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNorm2d
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), reference(x))
    states = zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in states)  # running statistics too
    undo()
    assert type(model[1]) is torch.nn.BatchNorm2d
