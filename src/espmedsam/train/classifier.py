"""Training the modality classifier (``models/classifier.py``) on a trained model's frozen encoder.

Each training image gives one or more pooled embeddings: variant 0 as prediction sees it, the others
through :func:`classifier_augmentation` (crops, rotations, colour, blur, JPEG), so the head learns what a
modality looks like rather than one dataset's framing, colour balance or resolution. Modalities with few
images get more variants, so every modality contributes about ``samples_per_modality`` embeddings. Only
the small head is trained, on those cached features: seconds, after one encoder pass per variant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from espmedsam.config import ClassifierConfig
from espmedsam.data.dataset import DatasetSource, SegmentationFolder
from espmedsam.errors import ConfigError
from espmedsam.models.classifier import ModalityClassifier
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.train.classifier_features import (  # noqa: F401  (re-exported)
    FeatureSet,
    Progress,
    classifier_augmentation,
    extract_features,
    variants_per_image,
)
from espmedsam.train.classifier_statistics import (
    DEFAULT_PERCENTILE,
    DEFAULT_RANK,
    attach_statistics,
    calibrate,
    fit_statistics,
    has_split,
    with_room_for_statistics,
)


@dataclass(frozen=True)
class ClassifierTraining:
    """How the head is trained."""

    input_size: int = 128
    hidden_dim: int = 256
    samples_per_modality: int = 600
    max_variants: int = 40
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    # per-modality feature statistics (``classifier_statistics``; 0: none; at most 2C - 1)
    statistics_rank: int = DEFAULT_RANK
    unknown_percentile: float = DEFAULT_PERCENTILE  # of the val images' distances: the unknown threshold


def fit_head(train: FeatureSet, num_modalities: int, settings: ClassifierTraining) -> ModalityClassifier:
    """Train a fresh head on pooled features with AdamW, cosine schedule and label smoothing."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    head = ModalityClassifier(train.features.shape[1] // 2, num_modalities, settings.hidden_dim)
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train.labels) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.epochs * steps_per_epoch)
    head.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(train.labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            picked = order[start : start + settings.batch_size]
            logits = head.head(train.features[picked])
            loss = F.cross_entropy(logits, train.labels[picked], label_smoothing=settings.label_smoothing)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return head.eval()


def confusion_matrix(head: ModalityClassifier, data: FeatureSet, num_modalities: int) -> np.ndarray:
    """(M, M) int counts: row = true modality, column = predicted."""
    with torch.inference_mode():
        predicted = head.head(data.features).argmax(1)
    matrix = np.zeros((num_modalities, num_modalities), dtype=np.int64)
    np.add.at(matrix, (data.labels.numpy(), predicted.numpy()), 1)
    return matrix


def attach_classifier(model: ESPMedSAM, head: ModalityClassifier, input_size: int) -> ESPMedSAM:
    """``model`` with ``head`` as its classifier and the classifier config recorded (in place)."""
    model.config = dataclasses.replace(
        model.config,
        classifier=ClassifierConfig(enabled=True, input_size=input_size, hidden_dim=head.fc1.out_features),
    )
    return attach_statistics(model, head)


def train_classifier(
    model: ESPMedSAM,
    sources: Sequence[DatasetSource],
    settings: ClassifierTraining = ClassifierTraining(),
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[ESPMedSAM, np.ndarray | None]:
    """Give ``model`` a classifier trained on the sources' train splits; returns it and the confusion
    matrix on their val splits (None when no source has one).

    With ``settings.statistics_rank``, the classifier also gets per-modality feature statistics fitted on
    the training features, and the unknown threshold calibrated on the val splits (on the training
    features when there are none: then fewer in-domain images than the percentile may pass).

    Raises:
        ConfigError: a modality the model does not know, or a model modality with no training images.
    """
    unknown = sorted({s.modality for s in sources} - set(model.config.modalities))
    if unknown:
        raise ConfigError(f"the model has no modality {', '.join(unknown)}")
    train_folders = [SegmentationFolder(s, "train", cache=True) for s in sources]
    counts = {m: sum(len(f) for f in train_folders if f.modality == m) for m in model.config.modalities}
    missing = [m for m, n in counts.items() if not n]
    if missing:
        raise ConfigError(f"no training images for modality {', '.join(missing)}")
    # extraction runs at the head's input size, so record it before the encoder passes
    model.config = dataclasses.replace(
        model.config, classifier=dataclasses.replace(model.config.classifier, input_size=settings.input_size)
    )
    variants = variants_per_image(counts, settings.samples_per_modality, settings.max_variants)
    train = extract_features(
        model, train_folders, variants, seed=settings.seed, device=device, progress=progress
    )
    names = model.config.modalities
    head = fit_head(train, len(names), settings)
    val_folders = [SegmentationFolder(s, "val") for s in sources if has_split(s, "val")]
    val = extract_features(model, val_folders, 1, device=device) if val_folders else None
    if settings.statistics_rank:
        rank = min(settings.statistics_rank, train.features.shape[1] - 1)
        head = with_room_for_statistics(head, rank)
        fit_statistics(head, train.features, train.labels)
        held_out = val or train
        calibrate(head, held_out.features, held_out.labels, names, settings.unknown_percentile)
    model = attach_classifier(model, head, settings.input_size)
    return model, None if val is None else confusion_matrix(head, val, len(names))
