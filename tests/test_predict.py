from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmedsam import Predictor, build_model
from espmedsam.errors import InputError
from espmedsam.predict import expand_inputs, modality_from_name, predict_paths


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


def test_predict_paths_requires_a_modality(tmp_path):
    predictor = Predictor(build_model("tiny"), size=64)
    path = _write(tmp_path / "case.png")
    with pytest.raises(InputError, match="--modality"):
        list(predict_paths(predictor, [path], tmp_path / "out"))
    results = list(predict_paths(predictor, [path], tmp_path / "out", modality="xray"))
    assert results[0].mask_path.exists() and results[0].overlay_path.exists()


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
