"""``espmedsam quality calibrate``: fitted on a val split, stored in the checkpoint, read by predict."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.cli import app
from espmedsam.config import PromptConfig
from espmedsam.errors import InputError
from espmedsam.models.registry import get_config
from espmedsam.train.quality import review_threshold

runner = CliRunner()


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_config("tiny"), prompt=PromptConfig(enabled=True)))
    return save_model(model, tmp_path / "m.safetensors")


def test_calibrate_then_predict_writes_the_score(checkpoint, datasets, tmp_path):
    out = tmp_path / "scored.safetensors"
    data = ["-d", datasets[0], "-d", datasets[1]]
    result = runner.invoke(
        app, ["quality", "calibrate", str(checkpoint), *data, "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "fitted on 4 val masks" in result.output
    model = load_model(out)
    assert model.quality.is_calibrated and 0 < float(model.quality.review_below) < 1
    before, after = load_model(checkpoint).state_dict(), model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the segmentation weights untouched
    assert "--refine self on the val splits" in result.output
    assert set(model.config.quality.refine_modalities) <= {"dermoscopy", "fundus"}
    info = runner.invoke(app, ["info", "--checkpoint", str(out)])
    assert "quality score" in info.output and "--refine self" in info.output, info.output
    image_dir = Path(datasets[0].split(":")[0]) / "images"
    predicted = runner.invoke(app, ["predict", str(image_dir), "-o", str(tmp_path / "p"), "--checkpoint",
                                    str(out), "--modality", "dermoscopy", "--device", "cpu"])  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert rows and all(0 <= float(r["predicted_dice"]) <= 1 and r["review"] in ("yes", "no") for r in rows)


def test_calibrating_on_the_test_split_is_refused(checkpoint, datasets, tmp_path):
    result = runner.invoke(app, ["quality", "calibrate", str(checkpoint), "-d", datasets[0], "-o",
                                 str(tmp_path / "x.safetensors"), "--split", "test"])  # fmt: skip
    assert isinstance(result.exception, InputError) and "validation split" in str(result.exception)


def test_review_threshold_flags_the_asked_share_of_failures():
    predicted = np.array([0.2, 0.4, 0.7, 0.9, 0.6, 0.95])
    dice = np.array([0.1, 0.3, 0.45, 0.9, 0.8, 0.97])  # three failures, scored 0.2, 0.4, 0.7
    threshold = review_threshold(predicted, dice, recall=0.6)
    assert 0.4 < threshold < 0.6  # two of the three flagged (score < threshold)
    assert review_threshold(predicted, np.ones(6)) == 0.5


def test_training_from_a_calibrated_checkpoint_drops_the_stale_score(checkpoint, tiny_config, tmp_path):
    from espmedsam.train.loop import build_network
    from espmedsam.train.quality import with_quality_head

    model = with_quality_head(load_model(checkpoint))
    model.quality.calibrated.fill_(True)
    path = save_model(model, tmp_path / "calibrated.safetensors")
    network = build_network(dataclasses.replace(tiny_config, init=str(path)))
    assert network.quality is not None and not network.quality.is_calibrated


def test_refinement_is_chosen_where_it_gains():
    from espmedsam.train.quality import QualitySamples, chosen_for_refinement, refine_gains

    samples = QualitySamples(
        torch.zeros(4, 8),
        torch.tensor([0.5, 0.7, 0.8, 0.9]),
        torch.tensor([0, 0, 2, 2]),
        ("a",) * 4,
        torch.tensor([0.6, 0.8, 0.8, 0.9]),
    )
    gains = refine_gains(samples, ["x", "y", "z"])
    assert [(g.modality, g.images) for g in gains] == [("x", 2), ("z", 2)]
    assert gains[0].gain == pytest.approx(0.1) and gains[1].gain == pytest.approx(0.0)
    assert chosen_for_refinement(gains) == ("x",)
