"""Validation during training: Dice per dataset at the training input size, on each image's valid region.

Images are resized and padded exactly as for training (``data.transforms.to_model_input``, no
augmentation); the prediction is ``logits > 0`` and Dice is computed on the unpadded top-left region only,
with the empty-mask rule of ``espmedsam.metrics``. The mean over datasets selects the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from espmedsam.data.dataset import SegmentationFolder
from espmedsam.data.transforms import to_model_input
from espmedsam.metrics import dice
from espmedsam.modalities import MODALITIES


class ValidationSet(Dataset):
    """Several folders at model input size, each item with its dataset index and valid region.

    Items: ``{"image": (3, S, S) float32, "mask": (1, S, S) float32, "modality": int64, "dataset": int64,
    "valid": (2,) int64 (h, w)}``.
    """

    def __init__(
        self, folders: Sequence[SegmentationFolder], size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.folders = list(folders)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self._index = [(f, i) for f, folder in enumerate(self.folders) for i in range(len(folder))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, within = self._index[index]
        sample = self.folders[which][within]
        image, mask, valid = to_model_input(sample.image, sample.mask, self.size, self.mean, self.std)
        return {
            "image": image,
            "mask": mask,
            "modality": torch.tensor(MODALITIES.index(sample.modality), dtype=torch.int64),
            "dataset": torch.tensor(which, dtype=torch.int64),
            "valid": torch.tensor(valid, dtype=torch.int64),
        }


def validate(
    model: nn.Module,
    dataset: ValidationSet,
    names: Sequence[str],
    *,
    batch_size: int = 8,
    bf16: bool = True,
    num_workers: int = 0,
) -> dict[str, float]:
    """Mean Dice of each dataset (``names[i]`` for folder ``i``); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    scores: dict[int, list[float]] = {}
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator().manual_seed(0)
    )
    try:
        with torch.no_grad():
            for batch in loader:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(batch["image"], batch["modality"]).masks
                predicted, truth = (logits > 0)[:, 0], (batch["mask"] > 0.5)[:, 0]
                for i, (h, w) in enumerate(batch["valid"].tolist()):
                    score = dice(predicted[i, :h, :w].numpy(), truth[i, :h, :w].numpy())
                    scores.setdefault(int(batch["dataset"][i]), []).append(score)
    finally:
        model.train(was_training)
    return {names[k]: sum(v) / len(v) for k, v in sorted(scores.items())}
