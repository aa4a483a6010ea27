from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.train.validate import ValidationSet, validate


class _Everywhere(nn.Module):
    """Predicts foreground everywhere (padding included)."""

    def forward(self, images, modality):
        return type("Out", (), {"masks": torch.ones(images.shape[0], 1, *images.shape[-2:])})()


def test_dice_is_computed_on_the_valid_region_only(tmp_path: Path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(torch.zeros(20, 40, 3, dtype=torch.uint8).numpy()).save(tmp_path / "images/a.png")
    Image.fromarray(torch.full((20, 40), 255, dtype=torch.uint8).numpy()).save(tmp_path / "masks/a.png")
    folder = SegmentationFolder(parse_dataset_arg(f"{tmp_path}:xray"), None)
    dataset = ValidationSet([folder], 64, (0.0,) * 3, (1.0,) * 3)
    item = dataset[0]
    assert item["valid"].tolist() == [32, 64] and item["mask"][0, 32:].sum() == 0
    assert validate(_Everywhere(), dataset, ["a"], bf16=False) == {"a": 1.0}
