from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from espmedsam.data.dataset import DatasetSource, SegmentationFolder
from espmedsam.data.sampler import BalancedSampler
from espmedsam.data.training_set import MixedModalityDataset
from espmedsam.errors import InputError

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def test_datasets_drawn_equally_and_items_uniformly():
    sampler = BalancedSampler([2, 10, 100], num_samples=6000, seed=0)
    indices = np.array(list(sampler))
    which = np.searchsorted([2, 12, 112], indices, side="right")
    counts = np.bincount(which, minlength=3)
    assert len(indices) == len(sampler) == 6000 and indices.min() >= 0 and indices.max() < 112
    assert np.all(np.abs(counts - 2000) < 150)
    assert np.all(np.abs(np.bincount(indices[which == 0]) - 1000) < 120)


def test_reproducible_and_resumable():
    a = BalancedSampler([3, 5], num_samples=10, seed=1)
    epochs = [list(a) for _ in range(3)]
    assert epochs[0] != epochs[1]
    b = BalancedSampler([3, 5], num_samples=10, seed=1)
    assert list(b) == epochs[0]
    state = b.state_dict()
    assert state == {"seed": 1, "epoch": 1}
    c = BalancedSampler([3, 5], num_samples=10, seed=99)
    c.load_state_dict(state)
    assert list(c) == epochs[1] and list(c) == epochs[2]
    c.set_epoch(0)
    assert list(c) == epochs[0]
    assert list(BalancedSampler([3, 5], num_samples=10, seed=2)) != epochs[0]


@pytest.mark.parametrize("sizes, n", [([], 4), ([3, 0], 4), ([3], 0)])
def test_invalid_arguments(sizes, n):
    with pytest.raises(InputError):
        BalancedSampler(sizes, n)


def _folders(make_dataset) -> list[SegmentationFolder]:
    small = make_dataset("small", stems=("a", "b"), split={"train": ["a", "b"]})
    large = make_dataset(
        "large", stems=("p", "q", "r", "s"), split={"train": ["p", "q", "r", "s"]}, gray=True
    )
    return [
        SegmentationFolder(DatasetSource(small, "fundus", "small"), "train", cache=True),
        SegmentationFolder(DatasetSource(large, "xray", "large"), "train", cache=True),
    ]


def test_mixed_dataset_items(make_dataset):
    dataset = MixedModalityDataset(_folders(make_dataset), 32, MEAN, STD)
    assert len(dataset) == 6 and dataset.dataset_sizes == [2, 4]
    item = dataset[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() > 0
    assert item["modality"].dtype == torch.int64 and int(item["modality"]) == 1 and int(item["dataset"]) == 1
    assert int(dataset[0]["modality"]) == 3 and int(dataset[0]["dataset"]) == 0
    with pytest.raises(IndexError):
        dataset[6]


def test_mixed_dataset_augmentation_per_item_and_epoch(make_dataset):
    dataset = MixedModalityDataset(_folders(make_dataset), 32, MEAN, STD, augment=True, seed=5)
    first = dataset[2]["image"]
    assert torch.equal(first, dataset[2]["image"])
    assert not torch.equal(first, MixedModalityDataset(_folders(make_dataset), 32, MEAN, STD)[2]["image"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[2]["image"])


def test_batches_through_data_loader(make_dataset):
    dataset = MixedModalityDataset(_folders(make_dataset), 32, MEAN, STD, augment=True, seed=0)
    sampler = BalancedSampler(dataset.dataset_sizes, num_samples=8, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=4, sampler=sampler)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["modality"].shape == (4,)
    assert batch["mask"].shape == (4, 1, 32, 32)


def test_same_size_batches_hold_one_size_each_and_cover_every_item_once():
    from espmedsam.data.sampler import indices_by_size, same_size_batches

    sizes = [192, 512, 192, 256, 192, 512, 192]
    batches = same_size_batches(sizes, batch_size=3)
    assert batches == [[0, 2, 4], [6], [1, 5], [3]]  # sizes in order of first appearance
    assert all(len({sizes[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert indices_by_size(sizes) == {192: [0, 2, 4, 6], 512: [1, 5], 256: [3]}
