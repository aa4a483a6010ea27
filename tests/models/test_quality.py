"""The quality score of prompt-free masks: its features, its fit, and that it never changes a mask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from espmedsam import build_model
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.config import PromptConfig
from espmedsam.metrics import agreement
from espmedsam.models.quality import QUALITY_FEATURES, MaskQuality
from espmedsam.models.registry import get_config
from espmedsam.models.self_prompt import refined_logits, self_prompts
from espmedsam.predict import Predictor
from espmedsam.train.quality import QualitySamples, fit_quality, with_quality_head

F = {name: i for i, name in enumerate(QUALITY_FEATURES)}


@pytest.fixture
def scored_model():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_config("tiny"), prompt=PromptConfig(enabled=True)))
    return with_quality_head(model)


def _logits(mask: np.ndarray, confidence: float = 8.0) -> torch.Tensor:
    return torch.from_numpy(np.where(mask, confidence, -confidence).astype(np.float32))[None, None]


def test_features_of_an_empty_and_a_confident_mask():
    quality = MaskQuality(num_modalities=2)
    empty = np.zeros((32, 32), bool)
    square = empty.copy()
    square[8:20, 4:16] = True
    logits = torch.cat([_logits(empty), _logits(square)])
    patches = torch.cat([_logits(empty[::8, ::8]), _logits(square[::8, ::8])])
    prompts = self_prompts(logits, [(32, 32), (32, 32)], None, quality.max_components)
    features = quality.features(logits, patches, [(32, 32), (32, 32)], prompts)
    assert features.shape == (2, len(QUALITY_FEATURES))
    assert features[0, F["empty"]] == 1 and features[0, F["self_dice"]] == 0
    assert features[1, F["empty"]] == 0 and features[1, F["self_dice"]] > 0.99
    assert features[1, F["uncertain_share"]] == 0 and features[1, F["log_components"]] == pytest.approx(
        np.log(2)
    )


def test_box_agreement_decodes_each_components_box_in_model_pixels():
    quality = MaskQuality(num_modalities=1, max_components=2)
    mask = np.zeros((32, 40), bool)
    mask[2:6, 3:9] = True  # 24 px
    mask[20:30, 10:30] = True  # 200 px, the largest
    mask[12, 36] = True  # 1 px: beyond max_components
    calls = []

    def decode(boxes, owners):
        calls.append((boxes.clone(), owners.clone()))
        out = torch.full((len(boxes), 1, 32, 40), -5.0)
        out[1, 0, 2:6, 3:9] = 5.0  # the small component's box gives exactly it back; the large one nothing
        return out, torch.tensor([0.9, 0.5])

    prompts = self_prompts(_logits(mask), [(32, 40)], decode, quality.max_components)
    features = quality.features(_logits(mask), _logits(mask[::8, ::8]), [(32, 40)], prompts)
    boxes, owners = calls[0]
    assert boxes.tolist() == [[10, 20, 29, 29], [3, 2, 8, 5]] and owners.tolist() == [0, 0]
    assert features[0, F["box_agreement"]] == pytest.approx(24 / 224)  # area-weighted: 0 x 200 + 1 x 24
    assert features[0, F["predicted_iou"]] == pytest.approx(0.7)
    # --refine self: each of the two components is replaced by its box's mask inside the box
    refined = refined_logits(_logits(mask), prompts, [0])[0, 0] > 0
    assert not refined[20:30, 10:30].any()  # the large one's box gave nothing
    assert refined[2:6, 3:9].all() and refined.sum() == 24 + 1  # the small one's gave it back; 1 px kept


def test_padding_is_left_out():
    quality = MaskQuality(num_modalities=1)
    mask = np.zeros((32, 32), bool)
    mask[:, 20:] = True  # only in the padding
    prompts = self_prompts(_logits(mask), [(32, 16)], None, quality.max_components)
    features = quality.features(_logits(mask), _logits(mask[::8, ::8]), [(32, 16)], prompts)
    assert features[0, F["empty"]] == 1


def test_fit_predicts_dice_in_range_and_ranks_it():
    rng = np.random.default_rng(0)
    dice = rng.uniform(0, 1, 200)
    features = rng.normal(size=(200, len(QUALITY_FEATURES)))
    features[:, F["box_agreement"]] = dice + rng.normal(0, 0.05, 200)  # one informative feature
    ids = torch.from_numpy(rng.integers(0, 2, 200))
    samples = QualitySamples(
        torch.tensor(features, dtype=torch.float32), torch.tensor(dice), ids, ("d",) * 200
    )
    quality = MaskQuality(num_modalities=3)
    assert not quality.is_calibrated
    fit_quality(quality, samples)
    predicted = quality(samples.features, ids).numpy()
    assert quality.is_calibrated and ((predicted >= 0) & (predicted <= 1)).all()
    fit = agreement(predicted, dice, 0.5)
    assert fit.spearman > 0.9 and fit.auroc > 0.95
    assert abs(predicted.mean() - dice.mean()) < 0.05  # calibrated, not only ranked
    # the modality without samples gets the others' mean bias
    assert quality.modality_bias[2] == pytest.approx(float(quality.modality_bias[:2].mean()))


def test_agreement_on_known_cases():
    fit = agreement(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 0.3, 0.7, 0.95]), 0.5)
    assert fit.spearman == pytest.approx(1.0) and fit.auroc == pytest.approx(1.0)
    assert (fit.failures, fit.flagged, fit.caught) == (2, 2, 2)
    worst = agreement(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0.0, 0.3, 0.7, 0.95]), 0.5)
    assert worst.auroc == pytest.approx(0.0)
    assert np.isnan(agreement(np.ones(3), np.ones(3), 0.5).auroc)


def test_the_score_never_changes_a_mask(scored_model):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((48, 80, 3), (64, 40), (70, 70, 3))]
    names = ["xray", "fundus", "xray"]
    plain = Predictor(scored_model, device="cpu").predict_many(images, names)
    scored_model.quality.calibrated.fill_(True)
    predictor = Predictor(scored_model, device="cpu")
    scored = predictor.predict_with_quality(images, names, [True, False, True])
    for a, b in zip(plain, scored, strict=True):
        assert np.array_equal(a, b.mask)
    assert scored[1].quality is None
    assert all(0 <= r.quality <= 1 for r in (scored[0], scored[2]))
    logits, score = predictor.predict_logits_with_quality(images[0], "xray")
    assert np.array_equal(logits > 0, plain[0]) and score == pytest.approx(scored[0].quality, abs=1e-6)


def test_uncalibrated_or_absent_score_gives_none(scored_model):
    image = np.zeros((40, 40, 3), np.uint8)
    assert not Predictor(scored_model, device="cpu").has_quality
    assert Predictor(scored_model, device="cpu").predict_with_quality([image], "xray")[0].quality is None
    without = build_model("tiny")
    assert Predictor(without, device="cpu").predict_logits_with_quality(image, "xray")[1] is None


def test_quality_head_round_trips_through_the_checkpoint(scored_model, tmp_path):
    with torch.no_grad():
        scored_model.quality.weight.normal_()
        scored_model.quality.calibrated.fill_(True)
    loaded = load_model(save_model(scored_model, tmp_path / "q.safetensors"))
    assert loaded.config.quality.enabled and loaded.quality.is_calibrated
    assert torch.equal(loaded.quality.weight, scored_model.quality.weight)


def test_adding_and_removing_a_modality_keeps_each_ones_score_bias(scored_model):
    from espmedsam.modality_edits import append_modality, remove_modality

    with torch.no_grad():
        scored_model.quality.modality_bias.copy_(torch.arange(6, dtype=torch.float32))
    grown = append_modality(scored_model, "dental")
    assert grown.quality.modality_bias.tolist() == [0, 1, 2, 3, 4, 5, 2.5]  # the new one: the mean
    shrunk = remove_modality(grown, "xray")
    assert shrunk.quality.modality_bias.tolist() == [0, 2, 3, 4, 5, 2.5]


def test_chosen_modalities_follow_removal_and_renaming(scored_model):
    from espmedsam.modality_edits import remove_modality, rename_modality

    config = scored_model.config
    quality = dataclasses.replace(config.quality, refine_modalities=("xray", "fundus"))
    prompt = dataclasses.replace(config.prompt, refit_clicked=("fundus", "xray"))
    scored_model.config = dataclasses.replace(config, quality=quality, prompt=prompt)
    shrunk = remove_modality(scored_model, "xray")
    assert shrunk.config.quality.refine_modalities == ("fundus",)
    assert shrunk.config.prompt.refit_clicked == ("fundus",)
    renamed = rename_modality(shrunk, "fundus", "retina")
    assert renamed.config.quality.refine_modalities == ("retina",)
    assert renamed.config.prompt.refit_clicked == ("retina",)


def test_refine_self_changes_only_the_chosen_modality(scored_model):
    config = scored_model.config
    scored_model.config = dataclasses.replace(
        config, quality=dataclasses.replace(config.quality, refine_modalities=("xray",))
    )
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    names = ["xray", "fundus", "xray", "fundus"]
    plain = Predictor(scored_model, device="cpu").predict_many(images, names)
    refining = Predictor(scored_model, device="cpu", refine=True)
    assert refining.refined_modalities == {"xray"}
    refined = refining.predict_many(images, names)
    for i in (1, 3):
        assert np.array_equal(plain[i], refined[i])  # not chosen: prompt-free, bitwise
    one = refining.predict_logits(images[0], "xray") > 0
    assert np.array_equal(one, refined[0])
    masks = refining.quality_features(images[0], "xray")
    assert np.array_equal(masks.mask, plain[0]) and np.array_equal(masks.refined, refined[0])
