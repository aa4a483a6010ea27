from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_pair(root: Path, stem: str, *, size=(20, 24), gray=False, image_suffix=".png", seed=0) -> None:
    """Write images/<stem><suffix> (RGB or gray) and masks/<stem>.png (0/255, a square of foreground)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}{image_suffix}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """Build ``tmp_path/<name>`` with pairs a..e and a train/val/test split.json."""

    def make(name: str = "fake", stems=("a", "b", "c", "d", "e"), split=None, **pair_options) -> Path:
        root = tmp_path / name
        for i, stem in enumerate(stems):
            write_pair(root, stem, seed=i, **pair_options)
        split = (
            split
            if split is not None
            else {"train": list(stems[:3]), "val": list(stems[3:4]), "test": list(stems[4:])}
        )
        (root / "split.json").write_text(json.dumps(split))
        return root

    return make
