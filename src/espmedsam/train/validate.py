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
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from espmedsam.data.dataset import SegmentationFolder
from espmedsam.data.transforms import to_model_input
from espmedsam.device import autocast
from espmedsam.metrics import dice
from espmedsam.modalities import MODALITIES
from espmedsam.train import distributed


class ValidationSet(Dataset):
    """Several folders at model input size, each item with its dataset index and valid region.

    Items: ``{"image": (3, S, S) float32, "mask": (1, S, S) float32, "modality": int64, "dataset": int64,
    "valid": (2,) int64 (h, w)}``.
    """

    def __init__(
        self,
        folders: Sequence[SegmentationFolder],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalisation: str = "mean_std",
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        self.folders = list(folders)
        self.size, self.mean, self.std, self.normalisation = size, tuple(mean), tuple(std), normalisation
        self.modalities = tuple(modalities)  # the model's: items carry ids into it
        self._index = [(f, i) for f, folder in enumerate(self.folders) for i in range(len(folder))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, within = self._index[index]
        sample = self.folders[which][within]
        image, mask, valid = to_model_input(
            sample.image, sample.mask, self.size, self.mean, self.std, self.normalisation
        )
        return {
            "image": image,
            "mask": mask,
            "modality": torch.tensor(self.modalities.index(sample.modality), dtype=torch.int64),
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
    device: torch.device | str = "cpu",
    across_ranks: bool = False,
) -> dict[str, float]:
    """Mean Dice of each dataset (``names[i]`` for folder ``i``); the model's train/eval mode is restored.

    ``dataset`` is a :class:`ValidationSet` of images, or a ``CachedEmbeddingSet`` of frozen-encoder
    embeddings (then only SPPG and QDMD run). ``across_ranks`` (every rank of the process group must call
    it): each rank scores images ``rank, rank + N, ...`` and the per-dataset Dice sums and counts are
    all-reduced, so every rank returns the Dice of the whole set.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    scores: dict[int, list[float]] = {}
    loader = DataLoader(
        Subset(dataset, distributed.strided_share(range(len(dataset)))) if across_ranks else dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate_by_size,
    )
    try:
        with torch.no_grad():
            for group in (group for groups in loader for group in groups):
                with autocast(device, bf16):
                    logits = forward_group(model, {k: v.to(device) for k, v in group.items()}).masks
                predicted, truth = (logits > 0)[:, 0].cpu(), (group["mask"] > 0.5)[:, 0]
                for i, (h, w) in enumerate(group["valid"].tolist()):
                    score = dice(predicted[i, :h, :w].numpy(), truth[i, :h, :w].numpy())
                    scores.setdefault(int(group["dataset"][i]), []).append(score)
    finally:
        model.train(was_training)
    if across_ranks:
        return _reduced_means(scores, names)
    return {names[k]: sum(v) / len(v) for k, v in sorted(scores.items())}


def _reduced_means(scores: dict[int, list[float]], names: Sequence[str]) -> dict[str, float]:
    """Per-dataset mean Dice over every rank's scores (datasets without images on any rank left out)."""
    totals = torch.zeros(len(names), 2, dtype=torch.float64)  # (sum, count) per dataset
    for k, values in scores.items():
        totals[k] = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    totals = distributed.all_reduce_sum(totals)
    return {names[k]: float(total / count) for k, (total, count) in enumerate(totals.tolist()) if count}


def forward_group(model: nn.Module, group: dict[str, torch.Tensor]) -> Any:
    """The model's output on one same-size group: images through the whole model, cached embeddings
    (key ``embedding``) through SPPG and QDMD alone, or a frozen prefix's cached ``features`` through the
    rest of the model."""
    if "features" in group:
        depth = int(group["depth"][0])
        return model.forward_from_features(group["features"], depth, group["image"], group["modality"])
    if "embedding" in group:
        return model.decode(group["embedding"], group["modality"], group["mask"].shape[-1])
    return model(group["image"], group["modality"])


def collate_by_size(items: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Items -> one stacked batch per input size, in order of first appearance (one group when all agree)."""
    key = next(k for k in ("features", "embedding", "image") if k in items[0])
    groups: dict[tuple[int, ...], list[dict[str, torch.Tensor]]] = {}
    for item in items:
        groups.setdefault(tuple(item[key].shape), []).append(item)
    return [default_collate(group) for group in groups.values()]
