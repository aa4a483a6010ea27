"""Per-modality feature statistics of the modality classifier (``models/classifier.py``), and their uses.

Each modality's normalised features (the pooled embedding after the classifier's LayerNorm, what ``fc1``
reads) get a probabilistic-PCA Gaussian: the mean, the ``rank`` leading principal directions with their
variances, and the mean variance of every other direction; its scale is the median distance of the
features it was fitted on. The unknown threshold is a high percentile of validation images' (scaled)
distance to their closest modality, so about that share of in-domain images is accepted.
``sample_hidden`` draws counter-examples from the Gaussians and lifts them through ``fc1`` and GELU into
the hidden features the last layer reads, so a new modality's class can be fitted without the old
modalities' images (``espmedsam add-modality``).

The normalised space was chosen over the pooled features and the hidden ones on the bundled checkpoint
(``benchmarks/results/unknown_modality.md``): at rank 32 it accepted as many in-domain test images and
flagged more out-of-scope ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from espmedsam.data.dataset import DatasetSource, SegmentationFolder, read_split
from espmedsam.errors import ConfigError
from espmedsam.models.classifier import ModalityClassifier
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.train.classifier_features import FeatureSet, extract_features, variants_per_image

DEFAULT_RANK = 32
DEFAULT_PERCENTILE = 99.5
_ROUNDED = ("statistics_mean", "statistics_basis", "statistics_log_variance", "statistics_log_residual",
            "statistics_scale")  # fmt: skip


@dataclass(frozen=True)
class Gaussian:
    """One modality's probabilistic-PCA Gaussian of (D,) features."""

    mean: torch.Tensor  # (D,)
    basis: torch.Tensor  # (k, D) orthonormal principal directions
    variance: torch.Tensor  # (k,) along them
    residual: torch.Tensor  # () along every other direction
    count: int  # features it was fitted on


@dataclass(frozen=True)
class Calibration:
    """The unknown threshold and the share of the calibration images under it, per modality."""

    threshold: float
    percentile: float
    accepted: dict[str, float]  # modality -> share of its calibration images accepted
    images: int


def fit_gaussian(features: torch.Tensor, rank: int) -> Gaussian:
    """(N, D) features -> their Gaussian. The residual variance is the mean eigenvalue beyond ``rank``
    (at least 1e-3 of the mean eigenvalue, so never 0); no principal variance is below it.

    Raises:
        ConfigError: fewer than 2 features.
    """
    if len(features) < 2:
        raise ConfigError(f"a modality's feature statistics need at least 2 images, got {len(features)}")
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (len(x) - 1))
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    rest = eigenvalues[rank:] if rank < len(eigenvalues) else eigenvalues[-1:]
    residual = torch.maximum(rest.mean(), 1e-3 * eigenvalues.mean()) + 1e-12
    variance = eigenvalues[:rank].clamp_min(residual)
    return Gaussian(
        mean.float(), eigenvectors[:, :rank].T.float(), variance.float(), residual.float(), len(x)
    )


def fit_statistics(
    classifier: ModalityClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int] | None = None,
) -> None:
    """Fit the Gaussian and scale of each of ``classes`` (default: all) in place, from (N, 2C) pooled
    features and their (N,) modality ids (the classifier on the features' device).

    Raises:
        ConfigError: a class with fewer than 2 features.
    """
    with torch.no_grad():
        normalised = classifier.norm(features.float())
        for index in range(classifier.fc2.out_features) if classes is None else classes:
            own = labels == index
            gaussian = fit_gaussian(normalised[own], classifier.statistics_rank)
            classifier.statistics_mean[index] = gaussian.mean
            classifier.statistics_basis[index] = gaussian.basis
            classifier.statistics_log_variance[index] = gaussian.variance.log()
            classifier.statistics_log_residual[index] = gaussian.residual.log()
            classifier.statistics_count[index] = gaussian.count
            classifier.statistics_scale[index] = 1.0
            classifier.statistics_scale[index] = classifier.distances(features[own])[:, index].median()


def calibrate(
    classifier: ModalityClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    percentile: float = DEFAULT_PERCENTILE,
) -> Calibration:
    """Set ``unknown_threshold`` to the ``percentile`` of the (N, 2C) calibration features' distance to
    their closest modality; returns it with the share accepted per modality ((N,) ``labels``).

    Raises:
        ConfigError: no calibration features, or a percentile outside (0, 100].
    """
    if not len(features):
        raise ConfigError("no images to calibrate the unknown-modality threshold on")
    if not 0 < percentile <= 100:
        raise ConfigError(f"the unknown-modality percentile must be in (0, 100], got {percentile}")
    with torch.no_grad():
        distance = classifier.unknown_distance(features.float()).cpu()
        classifier.unknown_threshold.fill_(float(np.percentile(distance.numpy(), percentile)))
    threshold = float(classifier.unknown_threshold)
    accepted = {
        name: float((distance[labels == i] <= threshold).float().mean())
        for i, name in enumerate(names)
        if bool((labels == i).any())
    }
    return Calibration(threshold, percentile, accepted, len(features))


def round_statistics(classifier: ModalityClassifier, dtype: torch.dtype | None) -> None:
    """Round the statistics to ``dtype`` and back in place, as a checkpoint in ``dtype`` holds them; the
    threshold rounds up, so no calibration image it accepted is lost."""
    if dtype is None:
        return
    with torch.no_grad():
        for name in _ROUNDED:
            buffer = getattr(classifier, name)
            buffer.copy_(buffer.to(dtype).float())
        threshold = classifier.unknown_threshold
        stored = threshold.to(dtype)
        if stored.float() < threshold:
            stored = torch.nextafter(stored, torch.tensor(float("inf"), dtype=dtype))
        threshold.copy_(stored.float())


def sample_normalised(
    classifier: ModalityClassifier, classes: Sequence[int], count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` normalised features drawn from each class's stored Gaussian -> (len(classes) * count, 2C)
    features and their (len(classes) * count,) int64 class ids, on the CPU."""
    drawn, labels = [], []
    for index in classes:
        basis = classifier.statistics_basis[index].cpu()  # (k, 2C)
        along = torch.randn(count, basis.shape[0], generator=generator)
        along = along * classifier.statistics_log_variance[index].cpu().exp().sqrt()
        other = torch.randn(count, basis.shape[1], generator=generator)
        other = (other - other @ basis.T @ basis) * classifier.statistics_log_residual[
            index
        ].cpu().exp().sqrt()
        drawn.append(classifier.statistics_mean[index].cpu() + along @ basis + other)
        labels.append(torch.full((count,), index, dtype=torch.int64))
    return torch.cat(drawn), torch.cat(labels)


def sample_hidden(
    classifier: ModalityClassifier, classes: Sequence[int], count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_normalised``'s draws lifted to hidden features, what the last layer reads ->
    (len(classes) * count, hidden_dim) on the CPU, and the class ids."""
    drawn, labels = sample_normalised(classifier, classes, count, generator)
    with torch.no_grad():
        hidden = classifier.lift(drawn.to(classifier.fc1.weight.device))
    return hidden.cpu(), labels


def with_room_for_statistics(classifier: ModalityClassifier, rank: int) -> ModalityClassifier:
    """A copy of ``classifier`` (same head weights) with empty statistics of ``rank``.

    Raises:
        ConfigError: a rank outside [1, 2C), 2C the pooled features' size.
    """
    size = classifier.fc1.in_features
    if not 0 < rank < size:
        raise ConfigError(f"the statistics rank must be in [1, {size}), got {rank}")
    new = ModalityClassifier(
        size // 2, classifier.fc2.out_features, classifier.fc1.out_features, statistics_rank=rank
    )
    head = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("statistics_", "unknown_"))}
    new.load_state_dict(head, strict=False)
    return new.to(classifier.fc1.weight.device).train(classifier.training)


def compute_statistics(
    model: ESPMedSAM,
    sources: Sequence[DatasetSource],
    *,
    rank: int = DEFAULT_RANK,
    percentile: float = DEFAULT_PERCENTILE,
    samples_per_modality: int = 600,
    seed: int = 0,
    device: torch.device | None = None,
    round_to: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ESPMedSAM, Calibration]:
    """``model`` (in place) with classifier statistics fitted on the sources' train splits (augmented
    variants, as ``classifier train`` extracts them) and the threshold calibrated on their val splits.

    Args:
        round_to: the dtype the checkpoint will store (e.g. float16): the statistics are rounded to it
            before the threshold is calibrated, so the threshold fits what is stored.
    Raises:
        ConfigError: a model without a classifier, a modality the model does not know, a model modality
            without training images, or no val split.
    """
    names = model.config.modalities
    if model.classifier is None:
        raise ConfigError("this checkpoint has no modality classifier (espmedsam classifier train adds one)")
    unknown = sorted({s.modality for s in sources} - set(names))
    if unknown:
        raise ConfigError(f"the model has no modality {', '.join(unknown)}")
    folders = [SegmentationFolder(s, "train", cache=True) for s in sources]
    counts = {m: sum(len(f) for f in folders if f.modality == m) for m in names}
    missing = [m for m, n in counts.items() if not n]
    if missing:
        raise ConfigError(f"no training images for modality {', '.join(missing)}")
    val = [SegmentationFolder(s, "val") for s in sources if has_split(s, "val")]
    if not val:
        raise ConfigError("no val split in the datasets: the unknown-modality threshold is calibrated on one")
    variants = variants_per_image(counts, samples_per_modality, 40)
    train = extract_features(model, folders, variants, seed=seed, device=device, progress=progress)
    held_out = extract_features(model, val, 1, device=device)
    return statistics_from_features(
        model, train, held_out, rank=rank, percentile=percentile, round_to=round_to
    )


def statistics_from_features(
    model: ESPMedSAM,
    train: FeatureSet,
    held_out: FeatureSet,
    *,
    rank: int = DEFAULT_RANK,
    percentile: float = DEFAULT_PERCENTILE,
    round_to: torch.dtype | None = None,
) -> tuple[ESPMedSAM, Calibration]:
    """``compute_statistics`` from features already extracted: Gaussians fitted on ``train``, the
    threshold calibrated on ``held_out`` (``FeatureSet``s of pooled features and modality ids).

    Raises:
        ConfigError: a model without a classifier, a bad rank or percentile, a modality with < 2 features.
    """
    if model.classifier is None:
        raise ConfigError("this checkpoint has no modality classifier (espmedsam classifier train adds one)")
    classifier = with_room_for_statistics(model.classifier, rank).cpu()
    fit_statistics(classifier, train.features, train.labels)
    round_statistics(classifier, round_to)
    names = model.config.modalities
    calibration = calibrate(classifier, held_out.features, held_out.labels, names, percentile)
    round_statistics(classifier, round_to)
    return attach_statistics(model, classifier), calibration


def attach_statistics(model: ESPMedSAM, classifier: ModalityClassifier) -> ESPMedSAM:
    """``model`` (in place) with ``classifier`` and a config that says whether it has statistics."""
    config = dataclasses.replace(
        model.config.classifier,
        statistics=classifier.has_statistics,
        statistics_rank=classifier.statistics_rank or model.config.classifier.statistics_rank,
    )
    model.config = dataclasses.replace(model.config, classifier=config)
    model.classifier = classifier.to(next(model.parameters()).device).eval()
    return model


def has_split(source: DatasetSource, split: str) -> bool:
    """Whether ``source`` has a split.json naming ``split``."""
    return (source.root / "split.json").is_file() and split in read_split(source.root)
