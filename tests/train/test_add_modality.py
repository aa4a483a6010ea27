"""Adding, removing and renaming modalities: the others keep their outputs bitwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from espmedsam.add_modality import add_modality
from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.cli import app
from espmedsam.config import ClassifierConfig
from espmedsam.errors import ConfigError, InputError
from espmedsam.modality_edits import (
    append_modality,
    modality_parameter_names,
    remove_modality,
    rename_modality,
)
from espmedsam.models.registry import build_model, get_config

runner = CliRunner()
FAST = ["epochs=1", "steps_per_epoch=3", "batch_size=4", "warmup_steps=1", "bf16=false", "variants=1"]


def _outputs(model, modalities, seed=0):
    """Mask and patch logits, and classifier logits, for a batch with one image per modality."""
    x = torch.randn(len(modalities), 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x, list(modalities))
        logits = model.classify(x) if model.classifier is not None else None
    return out.masks, out.patch_logits, logits


def _with_classifier(model):
    config = dataclasses.replace(model.config, classifier=ClassifierConfig(enabled=True, input_size=64))
    fresh = build_model(config)
    fresh.load_state_dict(model.state_dict(), strict=False)
    return fresh


def test_appending_keeps_every_existing_modality_bitwise():
    model = _with_classifier(build_model("tiny"))
    old = model.modalities
    before = _outputs(model, old)
    bigger = append_modality(model, "dental", like="xray")
    assert bigger.modalities == (*old, "dental")
    after = _outputs(bigger, old)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert torch.equal(before[2], after[2][:, : len(old)])  # old classes' logits unchanged
    # started from xray: the same outputs as xray until it is trained
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(bigger(x, "dental").masks, model(x, "xray").masks)


def test_removing_keeps_the_others_bitwise_and_renaming_changes_only_the_name():
    model = build_model("tiny")
    kept = [m for m in model.modalities if m != "fundus"]
    before = _outputs(model, kept)  # the same batch for both: batch shapes may change float rounding
    smaller = remove_modality(model, "fundus")
    assert smaller.modalities == tuple(kept)
    after = _outputs(smaller, kept)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    renamed = rename_modality(smaller, "xray", "chest_xray")
    assert renamed.modalities[1] == "chest_xray"
    assert torch.equal(_outputs(renamed, renamed.modalities)[0], before[0])


def test_a_seven_modality_config_round_trips(tmp_path):
    model = append_modality(build_model("tiny"), "dental", input_size=96)
    path = save_model(model, tmp_path / "seven.safetensors")
    loaded = load_model(path)
    assert loaded.modalities == model.modalities and len(loaded.modalities) == 7
    assert loaded.config == model.config and loaded.input_size("dental") == 96
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("xray", InputError, "has a modality 'xray' already"),
        ("Dental X", InputError, "must start with a lower-case letter"),
    ],
)
def test_bad_or_existing_names_are_refused(name, error, message):
    with pytest.raises(error, match=message):
        append_modality(build_model("tiny"), name)


def test_layouts_whose_modalities_share_parameters_are_refused():
    official = build_model(dataclasses.replace(get_config("official"), image_size=64))
    with pytest.raises(ConfigError, match="share parameters"):
        append_modality(official, "dental")


def test_add_modality_trains_only_the_new_parameters(tmp_path, dental, datasets):
    start = build_model("tiny")
    init = save_model(start, tmp_path / "tiny.safetensors")
    added = add_modality(
        "dental",
        [dental.rpartition(":")[0]],
        tmp_path / "seven.safetensors",
        init=init,
        like="dermoscopy",
        overrides=[*FAST, "frozen_encoder=false"],
        run_dir=tmp_path / "run",
    )
    trained = load_model(added.checkpoint)
    assert trained.modalities == (*start.modalities, "dental")
    owned = modality_parameter_names(trained, ["dental"])
    before, after = append_modality(start, "dental", like="dermoscopy").state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(owned)
    assert any(".controllers.6." in k for k in changed) and any("hypernetworks_mlps.6." in k for k in changed)
    query = "decoder.mask_query.weight"
    assert torch.equal(before[query][:6], after[query][:6]) and not torch.equal(
        before[query][6], after[query][6]
    )
    # no forgetting: every old modality's outputs are bitwise those of the starting checkpoint
    old = _outputs(start, start.modalities)
    new = _outputs(trained, start.modalities)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    assert added.trainable_parameters == sum(
        after[k].numel() if rows is None else after[k][0].numel() for k, rows in owned.items()
    )


def test_add_modality_on_a_frozen_encoder_and_the_classifier_extension(tmp_path, dental, datasets):
    start = _with_classifier(build_model("tiny"))
    for name in ("xray", "ultrasound", "microscopy", "colonoscopy"):
        start = remove_modality(start, name)
    assert start.modalities == ("dermoscopy", "fundus")
    init = save_model(start, tmp_path / "two.safetensors")
    with pytest.raises(InputError, match="the new modality's data must be"):
        add_modality("dental", [f"{dental}x"], tmp_path / "x.safetensors", init=init, run_dir=tmp_path / "r0")
    with pytest.raises(InputError, match="has a modality 'fundus' already"):
        bare = dental.rpartition(":")[0]
        add_modality("fundus", [bare], tmp_path / "x.safetensors", init=init, run_dir=tmp_path / "r0")
    with pytest.raises(ConfigError, match="--classifier-data DIR:MODALITY for dermoscopy, fundus"):
        add_modality("dental", [dental], tmp_path / "x.safetensors", init=init, run_dir=tmp_path / "r0")
    added = add_modality(
        "dental",
        [dental],
        tmp_path / "three.safetensors",
        init=init,
        classifier_data=list(datasets),
        overrides=[*FAST, f"cache_dir={tmp_path / 'cache'}"],
        run_dir=tmp_path / "run",
    )
    trained = load_model(added.checkpoint)
    assert trained.config.classifier.enabled and trained.classifier.fc2.out_features == 3
    old, new = _outputs(start, start.modalities), _outputs(trained, start.modalities)
    assert torch.equal(old[0], new[0]) and torch.equal(old[2], new[2][:, :2])  # old logits bitwise
    assert trained.classifier.fc2.weight[2].abs().sum() > 0
    assert added.classifier_recall > 0.9  # the new images are told apart from the others


def test_data_of_a_modality_the_model_lacks_is_named(tiny_config, dental):
    from espmedsam.train import train

    with pytest.raises(ConfigError, match="modality 'dental' is not one of the model's"):
        train(dataclasses.replace(tiny_config, data=(dental,)))


def test_modality_commands_remove_rename_and_info(tmp_path):
    path = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    result = runner.invoke(
        app, ["modality", "remove", str(path), "fundus", "--out", str(tmp_path / "a.safetensors")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "modality",
            "rename",
            str(tmp_path / "a.safetensors"),
            "xray",
            "cxr",
            "--out",
            str(tmp_path / "b.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", "--checkpoint", str(tmp_path / "b.safetensors")])
    assert "modalities dermoscopy, cxr, ultrasound, microscopy, colonoscopy" in " ".join(
        result.output.split()
    )
    result = runner.invoke(
        app, ["modality", "remove", str(path), "dental", "--out", str(tmp_path / "c.safetensors")]
    )
    assert isinstance(result.exception, InputError) and "unknown modality 'dental'" in str(result.exception)


def test_an_interrupted_addition_resumes_to_the_same_weights(tmp_path, dental):
    init = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    settings = [*FAST, "checkpoint_every=1", "frozen_encoder=false"]

    def run(name: str, **kwargs):
        return add_modality(
            "dental", [dental], tmp_path / f"{name}.safetensors", init=init, overrides=settings,
            run_dir=tmp_path / name, **kwargs,
        )  # fmt: skip

    whole = load_model(run("whole").checkpoint).state_dict()

    def stop_at_two(progress) -> None:
        if progress.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("cut", progress=stop_at_two)
    resumed = load_model(run("cut", resume=True).checkpoint).state_dict()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_the_classifier_extension_needs_no_old_images_with_statistics(tmp_path, dental, datasets):
    from espmedsam.add_modality import _check_classifier_data, extend_classifier
    from espmedsam.data.dataset import parse_dataset_arg
    from espmedsam.train.classifier import ClassifierTraining
    from espmedsam.train.classifier_statistics import compute_statistics

    start = build_model(
        dataclasses.replace(
            get_config("tiny"),
            modalities=("dermoscopy", "fundus"),
            classifier=ClassifierConfig(enabled=True, input_size=64, hidden_dim=16),
        )
    )
    with pytest.raises(ConfigError, match="espmedsam classifier stats"):
        _check_classifier_data(start, [])
    start, _ = compute_statistics(
        start, [parse_dataset_arg(d) for d in datasets], rank=4, samples_per_modality=8
    )
    _check_classifier_data(start, [])  # statistics stand in for the old modalities' images
    bigger = append_modality(start, "dental")
    assert bigger.classifier.statistics_count.tolist() == [8, 8, 0]  # the new class has none yet
    settings = ClassifierTraining(samples_per_modality=16, epochs=20, batch_size=16)
    recall = extend_classifier(bigger, "dental", [parse_dataset_arg(dental)], [], settings)
    assert recall > 0.9
    old, new = _outputs(start, start.modalities), _outputs(bigger, start.modalities)
    assert torch.equal(old[2], new[2][:, :2])  # the old classes' logits, bitwise
    classifier = bigger.classifier
    assert classifier.statistics_count.tolist() == [8, 8, 16]  # fitted on samples_per_modality of its own
    for name in ("statistics_mean", "statistics_basis", "statistics_scale", "unknown_threshold"):
        before, after = getattr(start.classifier, name), getattr(classifier, name)
        assert torch.equal(before, after if name == "unknown_threshold" else after[:2]), name
    # a saved and loaded copy keeps all of it; removing a modality removes its statistics' rows
    loaded = load_model(save_model(bigger, tmp_path / "three.safetensors"))
    assert torch.equal(loaded.classifier.statistics_mean, classifier.statistics_mean)
    smaller = remove_modality(loaded, "fundus").classifier
    assert torch.equal(smaller.statistics_basis, classifier.statistics_basis[[0, 2]])
