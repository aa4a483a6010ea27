from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmedsam import Predictor, build_model
from espmedsam.errors import InputError
from espmedsam.predict_files import expand_inputs, modality_from_name


def _write(path: Path, shape=(30, 40)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


def test_expand_inputs_files_folders_globs(tmp_path):
    a = _write(tmp_path / "a.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    b = _write(sub / "b.jpg")
    (sub / "notes.txt").write_text("x")
    assert expand_inputs([str(a), str(sub)]) == [a, b]
    assert expand_inputs([str(tmp_path / "**" / "*.jpg")]) == [b]
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.png")])


def test_modality_from_name():
    names = ("xray", "fundus")
    assert modality_from_name(Path("xray_case.png"), names) == "xray"
    assert modality_from_name(Path("case.png"), names) is None


def test_predictor_returns_mask_at_original_size():
    predictor = Predictor(build_model("tiny"), size=64)
    image = np.zeros((30, 45, 3), np.uint8)
    logits = predictor.predict_logits(image, "xray")
    assert logits.shape == (30, 45) and logits.dtype == np.float32
    mask = predictor.predict(image, "xray")
    assert mask.dtype == bool and np.array_equal(mask, logits > 0)


def test_predict_many_batches_same_size_inputs_like_single_predictions():
    predictor = Predictor(build_model("tiny"), size=64, bfloat16=False, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((30, 40, 3), (50, 20), (64, 64, 3))]
    names = ["xray", "fundus", "xray"]
    batched = predictor.predict_many(images, names)
    for image, name, mask in zip(images, names, batched, strict=True):
        single = predictor.predict(image, name)
        assert mask.shape == image.shape[:2] and (mask == single).mean() > 0.999


def test_predict_volume_gives_one_mask_per_slice():
    predictor = Predictor(build_model("tiny"), size=64)
    masks = predictor.predict_volume(np.zeros((5, 20, 30), np.uint8), "xray")
    assert masks.shape == (5, 20, 30) and masks.dtype == bool
    with pytest.raises(InputError, match="volume"):
        predictor.predict_volume(np.zeros((20, 30), np.uint8), "xray")


def test_predict_many_needs_one_modality_per_image():
    with pytest.raises(InputError, match="2 images but 1 modalities"):
        Predictor(build_model("tiny"), size=64).predict_many([np.zeros((8, 8), np.uint8)] * 2, ["xray"])


def test_predictor_uses_each_modality_input_size_unless_given_one():
    import dataclasses

    model = build_model("tiny")
    model.config = dataclasses.replace(model.config, inference_sizes=(64, 64, 64, 128, 64, 64))
    seen = []
    preprocess = model.preprocess
    model.preprocess = lambda image, size: seen.append(size) or preprocess(image, size)
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    Predictor(model).predict(image, "fundus")
    Predictor(model).predict(image, 0)
    Predictor(model, size=96).predict(image, "fundus")
    assert seen == [128, 64, 96]


def test_large_inputs_run_in_smaller_batches():
    predictor = Predictor(build_model("tiny"), size=64, batch_size=8, max_batch_pixels=2 * 64 * 64)
    batches = []
    segment = predictor._forward
    predictor._forward = lambda x, ids: batches.append(len(x)) or segment(x, ids)
    predictor.predict_many([np.zeros((20, 20), np.uint8)] * 5, "xray")
    assert batches == [2, 2, 1]


def _model_with_classifier(statistics: bool):
    """The tiny model with a classifier; with statistics fitted on random pooled features."""
    import dataclasses

    import torch

    from espmedsam.config import ClassifierConfig
    from espmedsam.models.registry import get_config
    from espmedsam.train.classifier_statistics import fit_statistics

    head = ClassifierConfig(
        enabled=True, input_size=32, hidden_dim=16, statistics=statistics, statistics_rank=4
    )
    model = build_model(dataclasses.replace(get_config("tiny"), classifier=head))
    if statistics:
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(60, model.classifier.fc1.in_features, generator=generator)
        fit_statistics(model.classifier, features, torch.arange(60) % len(model.modalities))
    return model


def test_an_older_checkpoint_without_statistics_loads_and_classifies(tmp_path):
    from safetensors import safe_open

    from espmedsam.checkpoints.native import load_model, save_model

    path = save_model(_model_with_classifier(statistics=False), tmp_path / "old.safetensors")
    with safe_open(str(path), framework="pt") as file:
        assert not [k for k in file.keys() if "statistics" in k or "unknown" in k]
    guess = Predictor(load_model(path)).classify(np.zeros((40, 50, 3), np.uint8))
    assert guess.known and guess.distance is None and guess.threshold is None
    assert guess.modality in guess.probabilities


def test_classify_says_unknown_over_the_threshold():
    model = _model_with_classifier(statistics=True)
    predictor = Predictor(model, bfloat16=False)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert predictor.unknown_threshold == float("inf")  # not calibrated: everything passes
    assert predictor.classify(image).known
    model.classifier.unknown_threshold.fill_(0.0)
    guess = predictor.classify(image)
    assert not guess.known and guess.distance > 0 and guess.threshold == 0.0
    volume = predictor.classify([image, image[::-1]])  # a volume: its slices' mean distance
    assert not volume.known and volume.distance > 0
    # the logits are the model's own: the check changes nothing of the choice
    import torch

    with torch.no_grad():
        expected = model.classify(model.classifier_input(image)).softmax(-1)[0]
    assert guess.probability == pytest.approx(float(expected.max()), abs=1e-6)
