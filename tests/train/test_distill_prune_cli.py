"""``espmedsam distill prune``: a narrower checkpoint, refitted, optionally distilled, with its record."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.cli import app
from espmedsam.errors import InputError

runner = CliRunner()


def _base(datasets, tmp_path) -> list[str]:
    torch.manual_seed(0)
    checkpoint = save_model(build_model("tiny"), tmp_path / "m.safetensors")
    return ["distill", "prune", str(checkpoint), "-d", datasets[0], "-d", datasets[1], "--crop", "32"]


def test_pruning_alone_writes_a_narrower_checkpoint_and_its_held_out_error(datasets, tmp_path):
    out = tmp_path / "pruned.safetensors"
    args = [*_base(datasets, tmp_path), "-o", str(out), "--mbconv-keep", "0.5", "--mlp-keep", "0.5"]
    result = runner.invoke(app, [*args, "--calibration-per-dataset", "2"])
    assert result.exit_code == 0, result.output
    teacher, model = load_model(tmp_path / "m.safetensors"), load_model(out)
    assert model.config.encoder.mlp_hidden_dims and model.config.encoder.mbconv_hidden_dims
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), "fundus").masks.shape == (1, 1, 64, 64)
    record = json.loads(out.with_suffix(".prune.json").read_text())
    assert record["widths"] == {"mbconv": 0.5, "mlp": [0.5, 0.5, 0.5]}
    assert [row["step"] for row in record["held_out"]] == [0] and record["losses"] == []


def test_with_minutes_the_pruned_layers_are_distilled(datasets, tmp_path):
    out = tmp_path / "pruned.safetensors"
    args = [*_base(datasets, tmp_path), "-o", str(out), "--calibration-per-dataset", "1", "--minutes", "5"]
    result = runner.invoke(app, [*args, "--steps", "2", "--eval-every", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".prune.json").read_text())
    assert [row["step"] for row in record["held_out"]] == [0, 1, 2] and len(record["losses"]) == 2
    assert load_model(out).config.encoder.mlp_hidden_dims


def test_no_calibration_images_is_refused_in_one_line(datasets, tmp_path):
    args = [*_base(datasets, tmp_path), "-o", str(tmp_path / "o"), "--calibration-per-dataset", "0"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, InputError)
    assert "--calibration-per-dataset must be at least 1" in str(result.exception)
