"""``espmedsam distill prune``: a narrower checkpoint, refitted, optionally distilled, with its record."""

from __future__ import annotations

import dataclasses
import json

import torch
from typer.testing import CliRunner

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.cli import app
from espmedsam.errors import InputError
from espmedsam.models.registry import tiny_config

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


def test_a_pruned_student_continues_with_its_decoders_learning_the_masks(datasets, tmp_path):
    pruned = tmp_path / "pruned.safetensors"
    args = [*_base(datasets, tmp_path), "--calibration-per-dataset", "1"]
    assert runner.invoke(app, [*args, "-o", str(pruned)]).exit_code == 0
    out = tmp_path / "continued.safetensors"
    result = runner.invoke(
        app,
        [*args, "-o", str(out), "--student", str(pruned), "--learn", "both", "--minutes", "5", "--steps", "2",
         "--eval-every", "1", "--batch-size", "2", "--lr", "1e-2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".prune.json").read_text())
    assert record["learned"] == "both" and record["continued_from"] == str(pruned)
    assert record["widths"] is None  # nothing was pruned this time
    before, after = load_model(pruned), load_model(out)
    assert after.config == before.config
    pairs = zip(before.decoder.parameters(), after.decoder.parameters(), strict=True)
    # the weights kept are those of the lowest held-out error: step 0's are the student's own
    assert any(not torch.equal(a, b) for a, b in pairs) == (record["best_step"] > 0)


def test_learning_the_decoders_without_masks_is_refused_in_one_line(datasets, tmp_path):
    args = [*_base(datasets, tmp_path), "-o", str(tmp_path / "o"), "--minutes", "1", "--mask-weight", "0"]
    result = runner.invoke(app, [*args, "--learn", "decoders"])
    assert isinstance(result.exception, InputError) and "--mask-weight" in str(result.exception)
    result = runner.invoke(app, [*args, "--learn", "everything"])
    assert isinstance(result.exception, InputError) and "--learn must be one of" in str(result.exception)


def test_continuing_a_student_without_minutes_is_refused_in_one_line(datasets, tmp_path):
    student = str(tmp_path / "m.safetensors")
    args = [*_base(datasets, tmp_path), "-o", str(tmp_path / "o"), "--student", student]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, InputError) and "--minutes" in str(result.exception)


def test_a_student_of_another_network_is_refused_in_one_line(datasets, tmp_path):
    config = tiny_config()
    wider = dataclasses.replace(config.encoder, embed_dims=tuple(2 * d for d in config.encoder.embed_dims))
    other = save_model(build_model(dataclasses.replace(config, encoder=wider)), tmp_path / "x.safetensors")
    args = [*_base(datasets, tmp_path), "-o", str(tmp_path / "o"), "--student", str(other), "--minutes", "1"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, InputError) and "not a pruned copy" in str(result.exception)
