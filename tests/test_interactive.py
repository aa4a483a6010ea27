"""The promptable decoder and the prompt path of ``Predictor``: embed once, decode many; no prompt means
the prompt-free output, bitwise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.config import PromptConfig
from espmedsam.errors import InputError
from espmedsam.interactive import _take_region
from espmedsam.models.registry import get_config
from espmedsam.models.summary import parameter_counts
from espmedsam.predict import Predictor
from espmedsam.prompting import Prompts


@pytest.fixture
def prompted_model():
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("tiny"), prompt=PromptConfig(enabled=True)))


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)


def test_decode_prompt_shapes_and_iou(prompted_model):
    embeddings = prompted_model.encode(torch.randn(2, 3, 64, 64), "xray")
    out = prompted_model.decode_prompt(
        embeddings,
        64,
        points=torch.tensor([[[3.0, 4.0]], [[30.0, 40.0]]]),
        labels=torch.tensor([[1], [0]]),
        boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0]]),
    )
    assert out.masks.shape == (2, 1, 64, 64) and out.iou.shape == (2,)
    assert torch.isfinite(out.masks).all() and torch.isfinite(out.iou).all()


def test_prompt_decoder_round_trips_and_is_counted(prompted_model, tmp_path):
    path = save_model(prompted_model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config.prompt.enabled and loaded.prompt_decoder is not None
    for name, tensor in prompted_model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    rows = {row.component: row.parameters for row in parameter_counts(loaded)}
    assert rows["promptable decoder (boxes, clicks, IoU head)"] > 0
    assert sum(v for k, v in rows.items() if k != "total") == rows["total"]


def test_no_prompt_gives_bitwise_the_prompt_free_mask(prompted_model, image):
    predictor = Predictor(prompted_model, device="cpu")
    free = predictor.predict(image, "xray")
    assert np.array_equal(predictor.predict(image, "xray", boxes=[], points=[]), free)
    assert np.array_equal(predictor.predict(image, "xray", boxes=None), free)
    # the prompt path's own prompt-free mask, from the kept embedding, is the same too
    prompter_free = _prompter(predictor, image)
    assert np.array_equal(prompter_free, free)


def _prompter(predictor, image):
    from espmedsam.interactive import PromptPredictor

    prompter = PromptPredictor(predictor)
    return prompter.prompt_free(prompter.embed(image, "xray"))


def test_the_embedding_is_computed_once_for_many_corrections(prompted_model, image, monkeypatch):
    calls = []
    encoder_forward = prompted_model.image_encoder.forward
    monkeypatch.setattr(
        prompted_model.image_encoder, "forward", lambda *a, **k: calls.append(1) or encoder_forward(*a, **k)
    )
    predictor = Predictor(prompted_model, device="cpu")
    predictor.predict(image, "xray", boxes=[[5, 5, 40, 30]])
    predictor.predict(image, "xray", boxes=[[5, 5, 40, 30]], points=[[10, 10]], labels=[0])
    predictor.predict(image, "xray", points=[[20, 20], [60, 40]], labels=[1, 0])
    assert len(calls) == 1
    predictor.predict(image[::-1].copy(), "xray", points=[[20, 20]])  # another image: embedded anew
    assert len(calls) == 2


def test_a_segmented_image_is_scored_and_corrected_from_one_embedding(prompted_model, image, monkeypatch):
    from espmedsam.train.quality import with_quality_head

    model = with_quality_head(prompted_model)
    with torch.no_grad():
        model.quality.weight.normal_(generator=torch.Generator().manual_seed(0))
        model.quality.calibrated.fill_(True)
    predictor = Predictor(model, device="cpu")
    (expected,) = predictor.predict_with_patch_maps([image], "xray", quality=True)
    calls = []
    encoder_forward = model.image_encoder.forward
    monkeypatch.setattr(
        model.image_encoder, "forward", lambda *a, **k: calls.append(1) or encoder_forward(*a, **k)
    )
    mask, patch_map = predictor.prompter.segment(image, "xray")
    # what predict_with_patch_maps gives, bitwise, and the same score from the kept embedding
    assert np.array_equal(mask, expected.mask) and np.array_equal(patch_map, expected.patch_map)
    assert predictor.prompter.quality(image, "xray") == expected.quality is not None
    predictor.predict(image, "xray", points=[[20, 20]])
    assert len(calls) == 1


def test_box_prompts_give_a_mask_and_one_iou_per_pass(prompted_model, image):
    predictor = Predictor(prompted_model, device="cpu")
    result = predictor.predict_prompted(image, "xray", Prompts.of([[2, 2, 30, 30], [40, 10, 70, 40]]))
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    assert len(result.iou) == 2


def test_prompts_outside_the_image_and_models_without_a_prompt_decoder(prompted_model, image):
    with pytest.raises(InputError, match="outside the 80x48 image"):
        Predictor(prompted_model, device="cpu").predict(image, "xray", boxes=[[0, 0, 80, 10]])
    with pytest.raises(InputError, match="no promptable decoder"):
        Predictor(build_model("tiny"), device="cpu").predict(image, "xray", points=[[1, 1]])


def test_a_click_takes_only_the_region_it_is_on():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    change = np.zeros_like(mask)
    change[1:3, 6:9] = True  # two regions the decoder would add: only the clicked one is taken
    change[8, 0] = True
    expected = mask.copy()
    expected[1:3, 6:9] = True
    _take_region(mask, change, 1, 7, add=True)
    assert np.array_equal(mask, expected)
    _take_region(mask, change, 5, 5, add=True)  # a click on no change changes nothing
    assert np.array_equal(mask, expected)
    _take_region(mask, expected, 2, 2, add=False)  # removal: the clicked region only
    assert not mask[1:4, 1:4].any() and mask[1:3, 6:9].all()


def test_a_background_click_on_no_object_keeps_the_prompt_free_mask(prompted_model, image):
    predictor = Predictor(prompted_model, device="cpu")
    free = predictor.predict(image, "xray")
    rows, columns = np.nonzero(~free)
    corrected = predictor.predict(image, "xray", points=[[columns[0], rows[0]]], labels=[0])
    assert np.array_equal(corrected, free)


def _cli_setup(prompted_model, image, tmp_path):
    from PIL import Image

    checkpoint = save_model(prompted_model, tmp_path / "prompted.safetensors")
    path = tmp_path / "xray_case.png"
    Image.fromarray(image).save(path)
    return checkpoint, path


def test_cli_box_and_point_prompts(prompted_model, image, tmp_path):
    import csv

    from typer.testing import CliRunner

    from espmedsam.cli import app

    checkpoint, path = _cli_setup(prompted_model, image, tmp_path)
    out = tmp_path / "out"
    args = ["predict", str(path), "-c", str(checkpoint), "-o", str(out)]
    args += ["--box", "2,2,40,30", "--point", "10,10,0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [row] = csv.DictReader((out / "predictions.csv").open())
    assert row["prompt_passes"] == "1" and row["predicted_iou"] != ""
    outside = CliRunner().invoke(app, [*args[:6], "--box", "0,0,500,10"])
    assert outside.exit_code != 0 and "outside the 80x48 image" in _said(outside)
    malformed = CliRunner().invoke(app, [*args[:6], "--point", "1;2"])
    assert malformed.exit_code != 0 and "--point '1;2'" in _said(malformed)


def test_cli_prompt_file_and_its_errors(prompted_model, image, tmp_path):
    import csv

    from typer.testing import CliRunner

    from espmedsam.cli import app

    checkpoint, path = _cli_setup(prompted_model, image, tmp_path)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,kind,x0,y0,x1,y1,label\nxray_case.png,box,2,2,40,30,\n")
    out = tmp_path / "out"
    base = ["predict", str(tmp_path), "-c", str(checkpoint), "-o", str(out)]
    result = CliRunner().invoke(app, [*base, "--prompts", str(prompts)])
    assert result.exit_code == 0, result.output
    [row] = csv.DictReader((out / "predictions.csv").open())
    assert row["prompt_passes"] == "1"
    prompts.write_text("image,kind,x0,y0,x1,y1,label\nother.png,box,2,2,40,30,\n")
    unknown = CliRunner().invoke(app, [*base, "--prompts", str(prompts)])
    assert unknown.exit_code != 0 and "other.png" in _said(unknown)
    plain = save_model(build_model("tiny"), tmp_path / "plain.safetensors")
    command = ["predict", str(path), "-c", str(plain), "-o", str(out), "--box", "1,1,9,9"]
    refused = CliRunner().invoke(app, command)
    assert refused.exit_code != 0 and "no promptable decoder" in _said(refused)


def _said(result) -> str:
    """What a failed command says: its output, or the library error that the CLI prints as one line."""
    return result.output + str(result.exception or "")
