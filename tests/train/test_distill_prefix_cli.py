"""``espmedsam distill prefix``: a faster checkpoint with the same output grid, written with its curve."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.cli import app
from espmedsam.errors import InputError
from espmedsam.models.registry import get_config

runner = CliRunner()


def test_the_cli_writes_a_patch2_checkpoint_and_its_curve(datasets, tmp_path):
    tiny = get_config("tiny")
    pointwise = dataclasses.replace(tiny, encoder=dataclasses.replace(tiny.encoder, stem="pointwise"))
    torch.manual_seed(0)
    checkpoint = save_model(build_model(pointwise), tmp_path / "m.safetensors")
    out = tmp_path / "fast.safetensors"
    args = ["distill", "prefix", str(checkpoint), "-d", datasets[0], "-d", datasets[1], "-o", str(out)]
    result = runner.invoke(
        app,
        [
            *args,
            "--steps",
            "3",
            "--eval-every",
            "2",
            "--batch-size",
            "2",
            "--crop",
            "32",
            "--mask-weight",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.config.encoder.stem == "patch2" and model.config.encoder.merge_strides[0] == 1
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), "fundus").embeddings.shape == (1, 32, 16, 16)
    record = json.loads(out.with_suffix(".prefix.json").read_text())
    assert [row["step"] for row in record["held_out"]] == [0, 2, 3] and len(record["losses"]) == 3
    assert record["mask_weight"] == 2.0 and all(row["masks"] >= 0 for row in record["held_out"])
    bad = runner.invoke(app, [*args, "--steps", "0"])
    assert isinstance(bad.exception, InputError) and "--steps" in str(bad.exception)


def test_a_strided_stem_is_refused_in_one_line(datasets, tmp_path):
    checkpoint = save_model(build_model("tiny"), tmp_path / "m.safetensors")
    result = runner.invoke(
        app, ["distill", "prefix", str(checkpoint), "-d", datasets[0], "-o", str(tmp_path / "o")]
    )
    assert isinstance(result.exception, InputError) and "pointwise stem" in str(result.exception)


def test_a_run_continues_from_its_student_and_refuses_another_model(datasets, tmp_path):
    tiny = get_config("tiny")
    pointwise = dataclasses.replace(tiny, encoder=dataclasses.replace(tiny.encoder, stem="pointwise"))
    torch.manual_seed(0)
    checkpoint = save_model(build_model(pointwise), tmp_path / "m.safetensors")
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    base = ["distill", "prefix", str(checkpoint), "-d", datasets[0], "--batch-size", "2", "--crop", "32"]
    assert runner.invoke(app, [*base, "-o", str(first), "--steps", "2"]).exit_code == 0
    result = runner.invoke(app, [*base, "-o", str(second), "--steps", "1", "--student", str(first)])
    assert result.exit_code == 0, result.output
    record = json.loads(second.with_suffix(".prefix.json").read_text())
    assert record["continued_from"] == str(first)
    # the held-out error before the continued run's first step is the first run's final one
    before = json.loads(first.with_suffix(".prefix.json").read_text())["held_out"]
    assert record["held_out"][0]["embedding"] == min(row["embedding"] for row in before)
    # the small prefix file, with the checkpoint, continues the run as well as the whole student
    prefix = first.with_suffix(".prefix.safetensors")
    assert prefix.exists()
    third = tmp_path / "third.safetensors"
    result = runner.invoke(app, [*base, "-o", str(third), "--steps", "1", "--student", str(prefix)])
    assert result.exit_code == 0, result.output
    again = json.loads(third.with_suffix(".prefix.json").read_text())["held_out"][0]
    assert again["embedding"] == pytest.approx(record["held_out"][0]["embedding"], rel=1e-6)
    wrong = runner.invoke(app, [*base, "-o", str(second), "--student", str(checkpoint)])
    assert isinstance(wrong.exception, InputError) and "not a cheaper-prefix student" in str(wrong.exception)
