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
