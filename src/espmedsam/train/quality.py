"""Calibrating the quality score (``models/quality.py``) on validation splits: ``quality calibrate``.

Every validation image is segmented prompt-free; its quality features and its true Dice (at the image's
own size) are collected, and ``MaskQuality``'s logistic model is fitted to predict the Dice: binary cross
entropy with the Dice as a soft target, L2 on the weights, L-BFGS. Validation images, not training ones:
on its training images the model's masks are better than on new ones, and the score would learn to trust
it too much. The fit is a step of the training recipe, so it is redone whenever the weights change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from espmedsam.config import QualityConfig
from espmedsam.data.dataset import DatasetSource, SegmentationFolder
from espmedsam.errors import ConfigError
from espmedsam.metrics import LOW_DICE
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.models.quality import DEFAULT_REVIEW_BELOW, QUALITY_FEATURES, MaskQuality
from espmedsam.models.registry import build_model
from espmedsam.predict import Predictor


@dataclass(frozen=True)
class QualitySamples:
    """Quality features and true Dice of prompt-free masks."""

    features: torch.Tensor  # (N, F)
    dice: torch.Tensor  # (N,)
    modality_ids: torch.Tensor  # (N,)
    datasets: tuple[str, ...]  # (N,) the dataset each image came from
    refined_dice: torch.Tensor | None = None  # (N,) Dice of the self-prompted masks (``--refine self``)


def with_quality_head(model: ESPMedSAM, max_components: int | None = None) -> ESPMedSAM:
    """``model`` rebuilt with an (uncalibrated) quality head; every other weight copied, so the masks are
    bitwise the same. A model that has one is returned as it is."""
    if model.quality is not None and max_components in (None, model.quality.max_components):
        return model
    quality = QualityConfig(enabled=True, max_components=max_components or QualityConfig().max_components)
    new = build_model(dataclasses.replace(model.config, quality=quality))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quality.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("quality.") for k in missing), (missing, unexpected)
    new.lineage = getattr(model, "lineage", [])
    return new.to(next(model.parameters()).device).eval()


def dice_score(mask: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks; 1 when both are empty."""
    total = int(mask.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float((mask & truth).sum()) / total


def collect_samples(
    predictor: Predictor, sources: Sequence[DatasetSource], split: str, progress=None
) -> QualitySamples:
    """Segment every image of ``split`` in each dataset -> its quality features and true Dice.

    ``progress``, if given, wraps the (folder, index) iterable (e.g. a rich progress bar).
    """
    folders = [SegmentationFolder(source, split) for source in sources]
    items: Iterable = [(folder, i) for folder in folders for i in range(len(folder))]
    if progress is not None:
        items = progress(items)
    features, dice, refined, ids, names = [], [], [], [], []
    for folder, index in items:
        sample = folder[index]
        masks = predictor.quality_features(sample.image, folder.modality)
        features.append(masks.features)
        dice.append(dice_score(masks.mask, sample.mask > 0))
        refined.append(dice_score(masks.refined, sample.mask > 0))
        ids.append(predictor.modalities.index(folder.modality))
        names.append(folder.name)
    if not features:
        raise ConfigError(f"no {split} images in the given datasets to calibrate on")
    return QualitySamples(
        torch.stack(features),
        torch.tensor(dice),
        torch.tensor(ids, dtype=torch.int64),
        tuple(names),
        torch.tensor(refined),
    )


def fit_quality(quality: MaskQuality, samples: QualitySamples, l2: float = 1e-2) -> float:
    """Fit ``quality``'s parameters to predict the samples' Dice, in place; returns the final loss.

    Features are standardised on the samples; a modality without samples gets the mean bias.
    """
    x, y = samples.features.double(), samples.dice.double().clamp(0, 1)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    num_modalities = quality.modality_bias.numel()
    weight = torch.zeros(len(QUALITY_FEATURES), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_modalities, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        logits = z @ weight + bias[samples.modality_ids]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * weight.square().sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    seen = torch.zeros(num_modalities, dtype=torch.bool)
    seen[samples.modality_ids.unique()] = True
    fitted = bias.detach().clone()
    fitted[~seen] = fitted[seen].mean()
    with torch.no_grad():
        quality.feature_mean.copy_(mean.float())
        quality.feature_scale.copy_(scale.float())
        quality.weight.copy_(weight.detach().float())
        quality.modality_bias.copy_(fitted.float())
        quality.calibrated.fill_(True)
    return float(loss_fn().detach())


def review_threshold(predicted: np.ndarray, dice: np.ndarray, recall: float = 0.7) -> float:
    """The lowest review threshold that flags at least ``recall`` of the masks with true Dice below
    ``LOW_DICE`` (a calibrated score puts many failures above 0.5: the threshold is chosen for catching
    them); ``DEFAULT_REVIEW_BELOW`` without failures."""
    scores = np.sort(np.asarray(predicted, float)[np.asarray(dice) < LOW_DICE])
    if not len(scores):
        return DEFAULT_REVIEW_BELOW
    needed = max(1, int(np.ceil(recall * len(scores))))
    return float(min(0.99, np.nextafter(scores[needed - 1], np.inf)))


@dataclass(frozen=True)
class RefineGain:
    """What self-prompting did to one modality's validation masks."""

    modality: str
    images: int
    prompt_free: float  # mean Dice
    refined: float  # mean Dice with ``--refine self``

    @property
    def gain(self) -> float:
        return self.refined - self.prompt_free


def refine_gains(samples: QualitySamples, modalities: Sequence[str]) -> list[RefineGain]:
    """Per modality with samples: mean validation Dice prompt-free and self-prompted."""
    if samples.refined_dice is None:
        return []
    gains = []
    for index, name in enumerate(modalities):
        mine = samples.modality_ids == index
        if mine.any():
            free, refined = samples.dice[mine].mean(), samples.refined_dice[mine].mean()
            gains.append(RefineGain(name, int(mine.sum()), float(free), float(refined)))
    return gains


def chosen_for_refinement(gains: Sequence[RefineGain], min_gain: float = 0.005) -> tuple[str, ...]:
    """The modalities on which self-prompting raised the mean validation Dice by at least ``min_gain``."""
    return tuple(g.modality for g in gains if g.gain >= min_gain)
