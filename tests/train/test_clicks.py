"""The click decoder: simulated clicks, its training, and clicks through ``Predictor.predict``."""

from __future__ import annotations

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
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.errors import InputError
from espmedsam.models.prompt_decoder import PromptedMasks
from espmedsam.models.registry import get_config
from espmedsam.models.self_prompt import refit_clicked
from espmedsam.models.summary import parameter_counts
from espmedsam.predict import Predictor
from espmedsam.train.clicks import (
    ClickSample,
    ClickSampleCache,
    ClickShift,
    click_dice,
    clicks_to_tensors,
    evaluate_clicks,
    largest_error_region,
    next_click,
    prepare_samples,
    refit_gains,
    shift_logits,
    train_clicks,
    with_click_decoder,
)

runner = CliRunner()


@pytest.fixture
def prompted_model():
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("tiny"), prompt=PromptConfig(enabled=True)))


@pytest.fixture(autouse=True)
def sample_cache_in_tmp(tmp_path, monkeypatch):
    """The CLI keeps its click samples under the test's own folder, never the user's cache."""
    root = tmp_path / "click-samples"
    monkeypatch.setattr("espmedsam.train.clicks.CLICK_SAMPLE_CACHE", root)
    return root


def test_a_missed_square_gets_a_foreground_click_at_its_centre():
    truth = np.zeros((20, 30), bool)
    truth[2:7, 3:8] = True  # small, found
    truth[10:19, 15:24] = True  # large, missed
    mask = truth.copy()
    mask[10:19, 15:24] = False
    assert next_click(mask, truth) == (19, 14, 1)


def test_a_spill_gets_a_background_click_and_no_error_gets_none():
    truth = np.zeros((16, 16), bool)
    mask = truth.copy()
    mask[4:9, 4:9] = True
    assert next_click(mask, truth) == (6, 6, 0)
    assert next_click(truth, truth) is None


def test_a_random_click_lies_in_the_largest_error_region():
    truth = np.zeros((16, 16), bool)
    truth[0:10, 0:10] = True
    mask = np.zeros_like(truth)
    mask[14, 14] = True  # a one-pixel spill, the smaller error
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y, label = next_click(mask, truth, rng)
        assert truth[y, x] and label == 1


def test_setting_the_largest_error_region_right_leaves_the_smaller_error():
    truth = np.zeros((16, 16), bool)
    truth[0:10, 0:10] = True
    mask = np.zeros_like(truth)
    mask[14, 14] = True
    region = largest_error_region(mask, truth)
    assert np.array_equal(region, truth)
    assert np.argwhere(mask ^ region ^ truth).tolist() == [[14, 14]]
    assert largest_error_region(truth, truth) is None


def test_clicks_are_padded_with_no_click():
    points, labels = clicks_to_tensors([[(1, 2, 1), (3, 4, 0)], []])
    assert points.shape == (2, 2, 2) and labels.tolist() == [[1, 0], [-1, -1]]
    assert points[0].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_an_untrained_click_decoder_changes_no_pixel(prompted_model):
    model = with_click_decoder(prompted_model)
    assert model.config.prompt.clicks
    embeddings = model.encode(torch.randn(2, 3, 64, 64), "xray")
    logits = torch.randn(2, 1, 64, 64) * 20
    out = model.decode_clicks(
        embeddings, 64, torch.tensor([[[5.0, 6.0]], [[30.0, 3.0]]]), torch.tensor([[1], [0]]), logits
    )
    assert out.masks.shape == (2, 1, 64, 64) and out.iou.shape == (2,)
    assert torch.equal(out.masks > 0, logits > 0)


def test_the_click_decoder_round_trips_and_is_listed(prompted_model, tmp_path):
    path = save_model(with_click_decoder(prompted_model), tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.click_decoder is not None and loaded.config.prompt.clicks
    rows = {row.component: row.parameters for row in parameter_counts(loaded)}
    assert rows["click decoder (clicks on the mask so far)"] > 0
    assert sum(v for k, v in rows.items() if k != "total") == rows["total"]
    info = runner.invoke(app, ["info", "--checkpoint", str(path)])
    assert "click decoder" in info.output


def test_a_model_without_a_promptable_decoder_gets_no_click_decoder():
    with pytest.raises(InputError, match="no promptable decoder"):
        with_click_decoder(build_model("tiny"))


def test_clicks_through_the_predictor_use_the_click_decoder_and_keep_what_they_decoded(
    prompted_model, monkeypatch
):
    model = with_click_decoder(prompted_model)
    predictor = Predictor(model, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    free = predictor.predict(image, "xray")
    calls = []
    decode = model.decode_clicks
    monkeypatch.setattr(model, "decode_clicks", lambda *a, **k: calls.append(1) or decode(*a, **k))
    points, labels = [(10, 10), (40, 20), (70, 40)], [1, 0, 1]
    # untrained: every pass returns the mask it was given
    assert np.array_equal(predictor.predict(image, "xray", points=points[:2], labels=labels[:2]), free)
    assert len(calls) == 2
    predictor.predict(image, "xray", points=points, labels=labels)
    assert len(calls) == 3  # the first two clicks' masks were kept: one pass for the third
    predictor.predict(image, "xray", points=points[:1], labels=labels[:1])  # undo to one click
    assert len(calls) == 3


def test_training_on_a_few_images_makes_one_click_help(prompted_model, datasets):
    """Overfitting four tiny images: the clicks must raise their Dice above the prompt-free one, and only
    the click decoder's weights may change."""
    model = with_click_decoder(prompted_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sources = [parse_dataset_arg(datasets[0])]
    samples = prepare_samples(model, sources, "train", bf16=False)
    assert len(samples) == 4 and samples[0].embedding.dtype == torch.float16
    model.requires_grad_(False)
    model.click_decoder.requires_grad_(True)
    untrained = evaluate_clicks(model, samples, 1, bf16=False)
    result = train_clicks(
        model, samples, samples, steps=60, batch_size=4, lr=3e-3, max_clicks=1, val_every=20, bf16=False
    )
    assert result.steps == 60 and [row["step"] for row in result.history] == [0, 20, 40, 60]
    assert untrained.mean[1] == untrained.mean[0]  # untrained: a click changes nothing
    assert result.best.mean[1] > untrained.mean[1] + 0.05, (result.history, untrained)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("click_decoder.") for k in changed)


def test_kept_samples_are_read_back_without_the_encoder(prompted_model, datasets, tmp_path, monkeypatch):
    """The second preparation on the same weights reads every sample from the cache (no encoder call)
    and gets the same samples; other weights get another fingerprint, so nothing stale is read."""
    model = with_click_decoder(prompted_model)
    cache = ClickSampleCache.for_model(model, tmp_path / "samples")
    sources = [parse_dataset_arg(datasets[0])]
    first = prepare_samples(model, sources, "train", bf16=False, cache=cache)
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    again = prepare_samples(model, sources, "train", bf16=False, cache=cache)
    assert not calls and len(again) == len(first) == 4
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.embedding, b.embedding) and torch.equal(a.logits, b.logits)
        assert np.array_equal(a.truth, b.truth) and a.valid == b.valid
        assert (a.dataset, a.modality) == (b.dataset, b.modality)
    other = ClickSampleCache.for_model(with_click_decoder(build_model(prompted_model.config)))
    assert other.dir.name != cache.dir.name
    for parameter in model.click_decoder.parameters():  # the click decoder's own weights do not count
        parameter.data.add_(1.0)
    assert ClickSampleCache.for_model(model, tmp_path / "samples").dir == cache.dir
    prepare_samples(model, sources, "train", bf16=False)  # without a cache: the encoder runs
    assert calls


def test_a_batch_with_one_sample_lost_writes_that_one_alone(prompted_model, datasets, tmp_path, monkeypatch):
    model = with_click_decoder(prompted_model)
    cache = ClickSampleCache.for_model(model, tmp_path / "samples")
    sources = [parse_dataset_arg(datasets[0])]
    first = prepare_samples(model, sources, "train", bf16=False, cache=cache)
    kept = sorted(cache.dir.rglob("*.npz"))
    assert len(kept) == len(first)
    kept[0].unlink()
    written = []
    put = cache.put
    monkeypatch.setattr(cache, "put", lambda key, sample: written.append(key) or put(key, sample))
    again = prepare_samples(model, sources, "train", bf16=False, cache=cache)
    assert [cache.path(key) for key in written] == [kept[0]] and kept[0].is_file()
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.logits, b.logits)


def test_the_cli_trains_and_writes_a_checkpoint_with_a_click_decoder(
    prompted_model, datasets, tmp_path, sample_cache_in_tmp
):
    checkpoint = save_model(prompted_model, tmp_path / "m.safetensors")
    out = tmp_path / "clicks.safetensors"
    args = ["prompts", "train-clicks", str(checkpoint), "-d", datasets[0], "-d", datasets[1], "-o", str(out)]
    result = runner.invoke(app, [*args, "--steps", "4", "--val-every", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "val Dice after 0..3 clicks" in result.output
    model = load_model(out)
    assert model.click_decoder is not None
    assert Path(out.with_suffix(".clicks.json")).exists()
    images = sum(
        len(SegmentationFolder(parse_dataset_arg(d), split))
        for d in datasets[:2]
        for split in ("train", "val")
    )
    assert len(list(sample_cache_in_tmp.rglob("*.npz"))) == images  # every image kept, once
    bad = runner.invoke(app, [*args, "--steps", "0"])
    assert isinstance(bad.exception, InputError) and "--steps" in str(bad.exception)
    for option, value in (("--random-clicks", "1.5"), ("--select-after", "4"), ("--shifted-masks", "-0.1"),
                          ("--max-shift", "-1")):  # fmt: skip
        bad = runner.invoke(app, [*args, option, value])
        assert isinstance(bad.exception, InputError) and option in str(bad.exception)


def test_centre_clicks_only_and_selection_after_one_click(prompted_model, datasets):
    """With ``random_share`` 0 every training click is the benchmark's (the same for a given mask), and
    the kept weights are the best after one click, not after all of them."""
    model = with_click_decoder(prompted_model)
    samples = prepare_samples(model, [parse_dataset_arg(datasets[0])], "train", bf16=False)
    model.requires_grad_(False)
    model.click_decoder.requires_grad_(True)
    result = train_clicks(
        model, samples, samples, steps=40, batch_size=4, lr=3e-3, max_clicks=2, val_every=10, bf16=False,
        random_share=0.0, select_after=1,
    )  # fmt: skip
    after_one = [row["dice"][1] for row in result.history]
    assert result.best.mean[1] == max(after_one)
    assert result.history[after_one.index(max(after_one))]["step"] == result.best_step


def test_the_embedding_pass_reads_a_cached_frozen_prefix(tiny_config, tmp_path):
    """Where training cached the frozen prefix's features, the embeddings made from them are the ones the
    whole encoder gives (up to the cache's float16)."""
    from espmedsam.train.clicks import find_prefix_cache
    from espmedsam.train.loop import build_datasets, build_network

    tiny = get_config("tiny")
    bare = dataclasses.replace(tiny, controller=dataclasses.replace(tiny.controller, enabled=False))
    start = save_model(build_model(bare), tmp_path / "start.safetensors")
    config = dataclasses.replace(
        tiny_config,
        init=str(start),
        model_overrides=("controller.enabled=true", "controller.first_stage=3"),
        frozen_prefix=3,
        train_shared_suffix=False,
        cache_dir=str(tmp_path / "cache"),
        bf16=False,
        num_workers=0,
    )
    model = build_network(config)
    build_datasets(config, model)  # fills the cache
    model.eval()
    assert find_prefix_cache(build_model("tiny"), tmp_path / "cache") is None  # other weights
    prefix = find_prefix_cache(model, tmp_path / "cache")
    assert prefix is not None and prefix.depth == 3
    sources = [parse_dataset_arg(config.data[0])]
    cached = prepare_samples(model, sources, "train", bf16=False, prefix=prefix)
    whole = prepare_samples(model, sources, "train", bf16=False)
    for a, b in zip(cached, whole, strict=True):
        assert np.array_equal(a.truth, b.truth) and a.valid == b.valid
        assert torch.allclose(a.embedding.float(), b.embedding.float(), atol=5e-3)
        assert torch.allclose(a.logits.float(), b.logits.float(), atol=5e-2)


def _square_logits(size: int, rows: slice, columns: slice) -> torch.Tensor:
    logits = torch.full((1, 1, size, size), -5.0)
    logits[0, 0, rows, columns] = 5.0
    return logits


def test_the_clicked_component_is_redrawn_from_its_box_and_nothing_else():
    logits = _square_logits(16, slice(2, 6), slice(2, 6))
    logits[0, 0, 10:13, 10:13] = 5.0  # a second component, not clicked
    boxes = []

    def decode(box, owners):
        boxes.append(box.tolist())
        return _square_logits(16, slice(3, 5), slice(3, 8)), torch.ones(1)  # spills past the box

    refit = refit_clicked(logits, (16, 16), 3, 3, decode)
    assert boxes == [[[2.0, 2.0, 5.0, 5.0]]]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[3:5, 3:6] = True  # the box's mask, inside the box only
    expected[10:13, 10:13] = True
    assert torch.equal(refit[0, 0] > 0, expected)
    for x, y, valid in ((0, 0, (16, 16)), (11, 11, (8, 8))):  # on nothing; outside the unpadded image
        assert torch.equal(refit_clicked(logits, valid, x, y, decode), logits)
    assert len(boxes) == 1


def _growing_click_decoder(model, monkeypatch) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``model``'s click decoder made to return a 32-px square at every click and its box decoder a 16-px
    square inside it, at the X-ray input side: (side, the grown logits, the tight logits)."""
    size = model.input_size("xray")
    grown = _square_logits(size, slice(8, 40), slice(8, 40))  # the click decoder's object
    tight = _square_logits(size, slice(16, 32), slice(16, 32))  # the box decoder's, from its box

    def decoded(logits: torch.Tensor, count: int) -> PromptedMasks:
        return PromptedMasks(logits.expand(count, -1, -1, -1), torch.ones(count))

    monkeypatch.setattr(model, "decode_clicks", lambda e, *a: decoded(grown, len(e)))
    monkeypatch.setattr(model, "decode_prompt", lambda e, *a, **k: decoded(tight, len(e)))
    return size, grown, tight


def test_a_foreground_click_redraws_its_object_on_the_chosen_modalities_only(prompted_model, monkeypatch):
    model = with_click_decoder(prompted_model)
    prompt = dataclasses.replace(model.config.prompt, refit_clicked=("xray",))
    model.config = dataclasses.replace(model.config, prompt=prompt)
    size, _, _ = _growing_click_decoder(model, monkeypatch)
    predictor = Predictor(model, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    on_xray = predictor.predict(image, "xray", points=[(20, 20)], labels=[1])
    assert on_xray.sum() == 16 * 16 and on_xray[16:32, 16:32].all()
    on_fundus = Predictor(model, device="cpu").predict(image, "fundus", points=[(20, 20)], labels=[1])
    assert on_fundus.sum() == 32 * 32  # fundus was not chosen: the click decoder's mask as it is
    background = predictor.predict(image, "xray", points=[(20, 20)], labels=[0])
    assert background.sum() == 32 * 32  # a background click redraws nothing


def test_calibrate_clicks_chooses_on_validation_and_copies_the_weights(prompted_model, datasets, tmp_path):
    checkpoint = save_model(with_click_decoder(prompted_model), tmp_path / "m.safetensors")
    out = tmp_path / "calibrated.safetensors"
    args = [
        "prompts",
        "calibrate-clicks",
        str(checkpoint),
        "-d",
        datasets[0],
        "-d",
        datasets[1],
        "-o",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--min-gain", "-1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "each clicked object redrawn from its box" in result.output and "3 clicks" in result.output
    calibrated = load_model(out)
    # any gain counts at --min-gain -1: both modalities are chosen
    assert set(calibrated.config.prompt.refit_clicked) == {"dermoscopy", "fundus"}
    before = load_model(checkpoint).state_dict()
    assert all(torch.equal(v, before[k]) for k, v in calibrated.state_dict().items())
    info = runner.invoke(app, ["info", "--checkpoint", str(out)])
    assert "a clicked object redrawn from its box on: dermoscopy, fundus" in info.output
    refused = runner.invoke(app, [*args, "--split", "test"])
    assert isinstance(refused.exception, InputError) and "validation split" in str(refused.exception)
    plain = save_model(build_model("tiny"), tmp_path / "plain.safetensors")
    refused = runner.invoke(
        app, ["prompts", "calibrate-clicks", str(plain), "-d", datasets[0], "-o", str(out)]
    )
    assert isinstance(refused.exception, InputError) and "no click decoder" in str(refused.exception)


def test_the_refit_choice_sees_a_box_decoder_that_draws_the_object_better(prompted_model, monkeypatch):
    """A click decoder that grows every object past the truth and a box decoder that draws it exactly: the
    redraw takes each image to Dice 1 after its first click, and the modality is chosen."""
    model = with_click_decoder(prompted_model)
    size, _, tight = _growing_click_decoder(model, monkeypatch)
    embedding = model.encode(torch.zeros(1, 3, size, size), "xray")[0].half()
    truth = (tight[0, 0] > 0).numpy()
    empty = torch.full((1, size, size), -5.0).half()  # the prompt-free mask found nothing
    samples = [ClickSample(embedding, empty, truth, (size, size), f"set{i}", "xray") for i in range(3)]
    plain = click_dice(model, samples, 2, bf16=False)
    refit = click_dice(model, samples, 2, refit=True, bf16=False)
    grown_dice = 2 * 16 * 16 / (16 * 16 + 32 * 32)
    assert plain[0][0] == 0 and plain[0][1] == pytest.approx(grown_dice)
    assert refit[0][:2] == [0.0, 1.0] and refit[0][2] == 1.0  # no error left: no second click
    (gain,) = refit_gains(model, samples, 2, bf16=False)
    assert (gain.modality, gain.images) == ("xray", 3)
    assert gain.gain == pytest.approx(1.0 - np.mean(gain.clicked)) and gain.gain > 0.2


def test_shifted_logits_move_each_image_by_its_offset_and_draws_keep_the_share():
    logits = torch.zeros(3, 1, 4, 4)
    shifted = shift_logits(logits, np.array([-2.0, 0.0, 1.5]))
    assert torch.equal(shifted[:, 0, 0, 0], torch.tensor([-2.0, 0.0, 1.5]))
    assert torch.equal(shifted[0], torch.full((1, 4, 4), -2.0))
    offsets = ClickShift(0.5, 3.0, np.random.default_rng(0)).draw(4000)
    assert np.all(np.abs(offsets) <= 3.0)
    assert 0.45 < np.mean(offsets != 0) < 0.55
    assert not ClickShift(0.0, 3.0, np.random.default_rng(0)).draw(100).any()


def test_a_correction_from_shifted_logits_starts_from_the_shifted_mask(prompted_model, datasets):
    """The untrained click decoder returns the mask it is given: from logits shifted by 6 its mask, and so
    its loss, is the shifted mask's; the stored samples stay as they were."""
    from espmedsam.losses import MaskLoss
    from espmedsam.train.clicks import _step

    model = with_click_decoder(prompted_model)
    samples = prepare_samples(model, [parse_dataset_arg(datasets[0])], "train", bf16=False)
    stored = [s.logits.clone() for s in samples]

    def loss(shift: ClickShift | None) -> float:
        rng = np.random.default_rng(0)
        with torch.no_grad():
            return _step(model, samples, 1, rng, MaskLoss(), False, 0.0, shift).item()

    plain = loss(None)
    assert loss(ClickShift(0.0, 6.0, np.random.default_rng(1))) == plain
    assert loss(ClickShift(1.0, 6.0, np.random.default_rng(1))) != plain
    assert all(torch.equal(s.logits, old) for s, old in zip(samples, stored, strict=True))
