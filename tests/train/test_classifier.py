from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.data.dataset import parse_dataset_arg
from espmedsam.errors import ConfigError, InputError
from espmedsam.models.registry import build_model, get_config
from espmedsam.train.classifier import (
    ClassifierTraining,
    FeatureSet,
    confusion_matrix,
    fit_head,
    train_classifier,
    variants_per_image,
)


def _two_modality_model():
    return build_model(dataclasses.replace(get_config("tiny"), modalities=("dermoscopy", "fundus")))


def test_train_classifier_attaches_a_head_that_survives_save_and_load(datasets, tmp_path):
    settings = ClassifierTraining(input_size=32, samples_per_modality=8, epochs=3, hidden_dim=16)
    model, confusion = train_classifier(
        _two_modality_model(), [parse_dataset_arg(d) for d in datasets], settings
    )
    assert model.config.classifier.enabled and model.config.classifier.input_size == 32
    assert confusion.shape == (2, 2) and confusion.sum() == 4  # two val images per dataset
    path = save_model(model, tmp_path / "with_head.safetensors")
    loaded = load_model(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.classify(x), model.classify(x))
    assert loaded.classify(x).shape == (2, 2)


def test_fit_head_separates_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    features = torch.randn(120, 16, generator=generator) + 6 * torch.nn.functional.one_hot(labels, 16)
    data = FeatureSet(features, labels)
    head = fit_head(data, 3, ClassifierTraining(epochs=60, batch_size=32, hidden_dim=16))
    matrix = confusion_matrix(head, data, 3)
    assert matrix.trace() == 120 and matrix.sum(1).tolist() == [40, 40, 40]


def test_every_model_modality_needs_training_images(datasets):
    with pytest.raises(ConfigError, match="no training images for modality xray"):
        train_classifier(build_model("tiny"), [parse_dataset_arg(d) for d in datasets])


def test_small_modalities_get_more_variants():
    assert variants_per_image({"a": 18, "b": 600, "c": 1000}, 600, 30) == {"a": 30, "b": 1, "c": 1}


def test_classifier_input_squashes_the_whole_image():
    model = build_model(
        dataclasses.replace(
            get_config("tiny"),
            classifier=dataclasses.replace(get_config("tiny").classifier, enabled=True, input_size=32),
        )
    )
    image = np.zeros((30, 90, 3), np.uint8)
    image[:, 45:] = 200
    x = model.classifier_input(image)
    assert x.shape == (1, 3, 32, 32)
    # no padding: the right half of the square holds the bright half of the image
    assert x[0, :, :, 17:].mean() > x[0, :, :, :15].mean()


def test_classify_without_a_classifier_is_a_clear_error():
    with pytest.raises(InputError, match="no modality classifier"):
        build_model("tiny").classify(torch.zeros(1, 3, 64, 64))


def test_classifier_train_command_writes_a_checkpoint_with_the_head(datasets, tmp_path):
    from typer.testing import CliRunner

    from espmedsam.cli import app

    source = save_model(_two_modality_model(), tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    args = ["classifier", "train", str(source), "--out", str(out), "--input-size", "32"]
    args += ["--samples-per-modality", "4", *[a for d in datasets for a in ("--data", d)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and load_model(out).classifier is not None
    assert "unknown threshold" in result.output and load_model(out).classifier.has_statistics


def test_classifier_training_stores_statistics_too(datasets):
    settings = ClassifierTraining(input_size=32, samples_per_modality=8, epochs=2, hidden_dim=16)
    model, _ = train_classifier(_two_modality_model(), [parse_dataset_arg(d) for d in datasets], settings)
    assert model.config.classifier.statistics and model.classifier.has_statistics
    assert model.classifier.statistics_rank == 32  # the default, below the 64 pooled features
    assert model.classifier.statistics_count.tolist() == [8, 8]
    assert torch.isfinite(model.classifier.unknown_threshold)
