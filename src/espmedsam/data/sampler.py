"""Balanced mixed-modality sampling: every dataset is drawn equally often, whatever its size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from espmedsam.errors import InputError


class BalancedSampler(Sampler[int]):
    """Indices into the concatenation of several datasets, each dataset drawn with equal probability.

    Each draw picks a dataset uniformly, then an item uniformly within it (with replacement), so small sets
    are repeated and large ones subsampled. Epoch ``e`` draws from a generator seeded with ``(seed, e)``;
    every ``iter()`` uses the current epoch and then advances it, so ``state_dict`` / ``load_state_dict``
    (seed and epoch) resume the exact sequence at an epoch boundary. ``set_epoch`` picks an epoch directly.

    Args:
        dataset_sizes: length of each dataset, in concatenation order.
        num_samples: indices per epoch.
        seed: base seed.
    Raises:
        InputError: no dataset, an empty dataset, or a non-positive ``num_samples``.
    """

    def __init__(self, dataset_sizes: Sequence[int], num_samples: int, seed: int = 0) -> None:
        if not dataset_sizes or min(dataset_sizes) < 1:
            raise InputError(f"balanced sampling needs non-empty datasets, got sizes {list(dataset_sizes)}")
        if num_samples < 1:
            raise InputError(f"num_samples must be positive, got {num_samples}")
        self.dataset_sizes = tuple(int(n) for n in dataset_sizes)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self._offsets = torch.tensor([0, *self.dataset_sizes]).cumsum(0)[:-1]

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        indices = self.indices(self.epoch)
        self.epoch += 1
        return iter(indices.tolist())

    def indices(self, epoch: int) -> torch.Tensor:
        """The (num_samples,) int64 indices of ``epoch`` (a pure function of seed and epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sizes = torch.tensor(self.dataset_sizes, dtype=torch.float64)
        which = torch.randint(len(sizes), (self.num_samples,), generator=generator)
        within = (
            torch.rand(self.num_samples, generator=generator, dtype=torch.float64) * sizes[which]
        ).long()
        return self._offsets[which] + within

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])


def indices_by_size(sizes: Sequence[int]) -> dict[int, list[int]]:
    """Item indices grouped by each item's input size, sizes in order of first appearance."""
    by_size: dict[int, list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    return by_size


def same_size_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices in batches of at most ``batch_size`` items of one input size (a batch is one tensor)."""
    return [
        group[start : start + batch_size]
        for group in indices_by_size(sizes).values()
        for start in range(0, len(group), batch_size)
    ]
