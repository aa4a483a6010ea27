"""The modality classifier's training features: pooled controller-free embeddings of dataset images, as
they are and augmented (``classifier_augmentation``), with more variants for modalities with few images.

Shared by the head's training (``train/classifier.py``) and its feature statistics
(``train/classifier_statistics.py``), below both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from espmedsam.data.dataset import SegmentationFolder
from espmedsam.data.transforms import reseed
from espmedsam.device import autocast
from espmedsam.models.classifier import ModalityClassifier
from espmedsam.models.espmedsam import ESPMedSAM

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class FeatureSet:
    """Pooled embeddings (N, 2C) float32 and their modality ids (N,) int64."""

    features: torch.Tensor
    labels: torch.Tensor


def classifier_augmentation(size: int, seed: int):
    """Albumentations ``Compose`` -> (size, size, 3) uint8: a random crop of 40-100 % of the image at any
    aspect ratio squashed to the square, flips, rotation, colour and gamma, one of blur, lower resolution
    or noise, and JPEG re-compression."""
    import albumentations as A

    compose = A.Compose(
        [
            A.RandomResizedCrop(size=(size, size), scale=(0.4, 1.0), ratio=(0.6, 1.7)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(rotate=(-30, 30), scale=(0.85, 1.15), p=0.5),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3),
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=(3, 5)),
                    A.Downscale(scale_range=(0.4, 0.8)),
                    A.GaussNoise(std_range=(0.02, 0.08)),
                ],
                p=0.4,
            ),
            A.ImageCompression(quality_range=(40, 95), p=0.3),
        ]
    )
    reseed(compose, seed)
    return compose


def variants_per_image(
    counts: dict[str, int], samples_per_modality: int, max_variants: int
) -> dict[str, int]:
    """Modality -> embeddings per image, so each modality has about ``samples_per_modality`` in all."""
    return {m: max(1, min(max_variants, math.ceil(samples_per_modality / n))) for m, n in counts.items() if n}


@torch.inference_mode()
def extract_features(
    model: ESPMedSAM,
    folders: Sequence[SegmentationFolder],
    variants: dict[str, int] | int = 1,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    bfloat16: bool = True,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> FeatureSet:
    """Pooled controller-free embeddings of every image of ``folders`` (``variants`` per image; variant 0
    unaugmented) at ``model.config.classifier.input_size``."""
    device = device or next(model.parameters()).device
    side = model.config.classifier.input_size
    jobs = [
        (folder, i, v)
        for folder in folders
        for i in range(len(folder))
        for v in range(variants if isinstance(variants, int) else variants[folder.modality])
    ]
    features, labels, batch = [], [], []
    for done, (folder, index, variant) in enumerate(jobs, 1):
        image = folder[index].image
        if variant:
            image = classifier_augmentation(side, seed * 1_000_003 + done)(image=image)["image"]
        batch.append(model.classifier_input(image))
        labels.append(model.config.modalities.index(folder.modality))
        if len(batch) == batch_size or done == len(jobs):
            with autocast(device, bfloat16):
                embeddings = model.encode(torch.cat(batch).to(device), None)
            features.append(ModalityClassifier.pool(embeddings).cpu())
            batch = []
        if progress:
            progress(done, len(jobs))
    return FeatureSet(torch.cat(features), torch.tensor(labels, dtype=torch.int64))
