"""Per-modality feature statistics of the classifier: fitting, storing, calibration, sampling, unknowns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.config import ClassifierConfig
from espmedsam.data.dataset import parse_dataset_arg
from espmedsam.errors import ConfigError
from espmedsam.models.classifier import ModalityClassifier, mahalanobis
from espmedsam.models.registry import build_model, get_config
from espmedsam.train.classifier_statistics import (
    calibrate,
    compute_statistics,
    fit_gaussian,
    fit_statistics,
    round_statistics,
    sample_hidden,
    sample_normalised,
    with_room_for_statistics,
)

HEAD = ClassifierConfig(enabled=True, input_size=32, hidden_dim=16)


def two_modality_model(classifier: ClassifierConfig = HEAD):
    config = dataclasses.replace(
        get_config("tiny"), modalities=("dermoscopy", "fundus"), classifier=classifier
    )
    return build_model(config)


def clusters(count: int, seed: int, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count * M, D) pooled features around M centres and their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(count)
    return centres[labels] + 0.3 * torch.randn(len(labels), centres.shape[1], generator=generator), labels


@pytest.fixture
def fitted() -> tuple[ModalityClassifier, torch.Tensor]:
    """A 3-class classifier on 16-d pooled features with statistics of rank 4, and the class centres."""
    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    classifier = with_room_for_statistics(ModalityClassifier(8, 3, 16), 4).eval()
    fit_statistics(classifier, *clusters(200, 2, centres))
    return classifier, centres


def test_full_rank_statistics_give_the_exact_mahalanobis_distance():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=generator) @ torch.randn(5, 5, generator=generator)
    gaussian = fit_gaussian(x, rank=5)
    points = torch.randn(7, 5, generator=generator)
    z = (points - x.mean(0)).double()
    exact = (z @ torch.linalg.inv(torch.cov(x.T.double())) * z).sum(1).sqrt()
    got = mahalanobis(points, gaussian.mean[None], gaussian.basis[None], gaussian.variance[None],
                      gaussian.residual[None])[:, 0]  # fmt: skip
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)


def test_a_point_far_from_every_class_is_unknown(fitted):
    classifier, centres = fitted
    held_out, labels = clusters(100, 3, centres)
    calibration = calibrate(classifier, held_out, labels, ["a", "b", "c"], percentile=99)
    assert calibration.images == 300 and min(calibration.accepted.values()) >= 0.95
    far = 3 * torch.randn(50, 16, generator=torch.Generator().manual_seed(4))  # other directions
    assert bool((classifier.unknown_distance(far) > calibration.threshold).all())
    assert float(classifier.unknown_threshold) == calibration.threshold
    # each class's own features sit at about distance 1 after its scale
    with torch.no_grad():
        own = classifier.distances(held_out).gather(1, labels[:, None]).median()
    assert 0.7 < float(own) < 1.5


def test_samples_follow_the_stored_gaussians_and_lift_to_hidden_features(fitted):
    classifier, _ = fitted
    drawn, labels = sample_normalised(classifier, [0, 2], 4000, torch.Generator().manual_seed(0))
    assert drawn.shape == (8000, 16) and labels.tolist() == [0] * 4000 + [2] * 4000
    torch.testing.assert_close(drawn[labels == 2].mean(0), classifier.statistics_mean[2], atol=0.05, rtol=0)
    spread = drawn[labels == 0] - classifier.statistics_mean[0]
    along = spread @ classifier.statistics_basis[0].T
    torch.testing.assert_close(along.var(0), classifier.statistics_log_variance[0].exp(), rtol=0.1, atol=1e-4)
    hidden, same = sample_hidden(classifier, [0, 2], 4000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(same, labels) and torch.equal(hidden, classifier.lift(drawn))


def test_a_classifier_without_statistics_for_a_class_leaves_it_out(fitted):
    classifier, centres = fitted
    classifier.statistics_count[1] = 0
    assert torch.isinf(classifier.distances(centres)[:, 1]).all()
    fresh = ModalityClassifier(8, 3, 16, statistics_rank=4)  # no statistics yet, no threshold: all known
    assert bool((fresh.unknown_distance(centres) <= fresh.unknown_threshold).all())


def test_rounding_to_float16_rounds_the_threshold_up(fitted):
    classifier, _ = fitted
    classifier.unknown_threshold.fill_(1.00017)
    round_statistics(classifier, torch.float16)
    threshold = classifier.unknown_threshold
    assert threshold >= 1.00017 and threshold.half().float() == threshold


def test_statistics_are_stored_and_loaded(datasets, tmp_path):
    model = two_modality_model()
    sources = [parse_dataset_arg(d) for d in datasets]
    model, calibration = compute_statistics(
        model, sources, rank=4, samples_per_modality=8, round_to=torch.float16
    )
    assert model.config.classifier.statistics and model.config.classifier.statistics_rank == 4
    assert model.classifier.statistics_count.tolist() == [8, 8]  # 4 images x 2 variants each
    assert calibration.images == 4 and calibration.threshold <= float(model.classifier.unknown_threshold)
    path = save_model(model, tmp_path / "stats.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as file:
        stored = {k for k in file.keys() if k.startswith("classifier.")}
    assert {"classifier.statistics_mean", "classifier.unknown_threshold"} <= stored
    loaded = load_model(path)
    buffers = dict(loaded.classifier.named_buffers())
    for name, buffer in model.classifier.named_buffers():  # rounded as stored: bitwise the same
        assert torch.equal(buffers[name], buffer), name


def test_statistics_need_every_modality_and_a_classifier(datasets):
    sources = [parse_dataset_arg(datasets[0])]
    with pytest.raises(ConfigError, match="no training images for modality fundus"):
        compute_statistics(two_modality_model(), sources, rank=4)
    with pytest.raises(ConfigError, match="has no modality classifier"):
        compute_statistics(build_model("tiny"), sources)
    with pytest.raises(ConfigError, match=r"rank must be in \[1, 16\)"):
        with_room_for_statistics(ModalityClassifier(8, 2, 16), 16)
    with pytest.raises(ConfigError, match=r"classifier.statistics_rank must be in \[1, 64\)"):
        dataclasses.replace(
            get_config("tiny"), classifier=dataclasses.replace(HEAD, statistics=True, statistics_rank=64)
        )


def test_classifier_stats_command_writes_the_checkpoint_with_statistics(datasets, tmp_path):
    from typer.testing import CliRunner

    from espmedsam.cli import app

    source = save_model(two_modality_model(), tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    args = ["classifier", "stats", str(source), "--out", str(out), "--rank", "4", "--fp16"]
    args += ["--samples-per-modality", "4", *[a for d in datasets for a in ("--data", d)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "unknown threshold" in result.output and "bytes" in result.output
    assert load_model(out).classifier.has_statistics
