"""Several dataset folders concatenated into model-ready training samples (see ``BalancedSampler``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from espmedsam.data.dataset import SegmentationFolder
from espmedsam.data.transforms import reseed, to_model_input, train_augmentation
from espmedsam.errors import InputError
from espmedsam.modalities import MODALITIES


class FolderEpochs:
    """Dataset folders drawn per epoch: sizes for ``BalancedSampler``, and the epoch that seeds the draws."""

    folders: list[SegmentationFolder]
    epoch: int = 0

    @property
    def dataset_sizes(self) -> list[int]:
        """Length of each folder, in order (for ``BalancedSampler``)."""
        return [len(folder) for folder in self.folders]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class MixedModalityDataset(FolderEpochs, Dataset):
    """Concatenated folders -> dicts of model inputs, optionally augmented.

    Index ``i`` runs over the folders in order (folder 0's items first). With ``augment``, the augmentation
    of item ``i`` is drawn from ``(seed, epoch, i)`` alone, so it does not depend on worker count or order;
    call :meth:`set_epoch` each epoch (before the ``DataLoader`` starts its workers) to get new draws.

    Args:
        folders: the datasets; each knows its modality.
        size: S, the padded square side.
        mean, std: pixel statistics on the 0..255 scale (``ModelConfig.pixel_mean`` / ``pixel_std``).
        augment: apply :func:`~espmedsam.data.transforms.train_augmentation`.
        zoom_probability: its chance of a zoomed-in crop instead of the whole image.
        seed: base seed of the augmentation.
    Returns (per item):
        ``{"image": (3, S, S) float32, "mask": (1, S, S) float32, "modality": int64 id,
        "dataset": int64 folder index}``.
    """

    def __init__(
        self,
        folders: Sequence[SegmentationFolder],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        zoom_probability: float = 0.0,
        seed: int = 0,
        normalisation: str = "mean_std",
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        if not folders:
            raise InputError("MixedModalityDataset needs at least one dataset folder")
        self.folders = list(folders)
        self.modalities = tuple(modalities)  # the model's: items carry ids into it
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.seed, self.epoch, self.normalisation = seed, 0, normalisation
        self._augmentation = train_augmentation(size, zoom_probability=zoom_probability) if augment else None
        self._starts = np.cumsum([0, *(len(f) for f in self.folders)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        sample = self.folders[which][index - int(self._starts[which])]
        image, mask = sample.image, sample.mask
        if self._augmentation is not None:
            reseed(self._augmentation, _item_seed(self.seed, self.epoch, index))
            out = self._augmentation(image=image, mask=mask.astype(np.uint8))
            image, mask = out["image"], out["mask"]
        image_tensor, mask_tensor, _ = to_model_input(
            image, mask, self.size, self.mean, self.std, self.normalisation
        )
        return {
            "image": image_tensor,
            "mask": mask_tensor,
            "modality": torch.tensor(self.modalities.index(sample.modality), dtype=torch.int64),
            "dataset": torch.tensor(which, dtype=torch.int64),
        }


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
