from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmedsam.config import TrainConfig

# the bundled layout grown from a controller-free start: controllers in the last stage, a detail branch
GROWN = ("controller.enabled=true", "controller.first_stage=3", "detail.enabled=true")


def make_dataset(
    root: Path,
    *,
    seed: int,
    shape: tuple[int, int] = (48, 48),
    n: int = 6,
    tint: tuple[float, ...] = (1, 1, 1),
) -> Path:
    """A folder dataset (images/, masks/, split.json) of ``n`` noisy images with a bright square."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = [f"case_{i}" for i in range(n)]
    for stem in stems:
        h, w = shape
        mask = np.zeros(shape, np.uint8)
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[top : top + h // 3, left : left + w // 3] = 255
        image = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        image[mask > 0] += 150
        image = (image * np.array(tint)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    split = {"train": stems[:4], "val": stems[4:], "test": []}
    (root / "split.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> tuple[str, ...]:
    """Two tiny datasets of two modalities, as ``DIR:MODALITY`` strings (the second not square)."""
    base = tmp_path_factory.mktemp("data")
    return (
        f"{make_dataset(base / 'derm', seed=1)}:dermoscopy",
        f"{make_dataset(base / 'fundus', seed=2, shape=(40, 56))}:fundus",
    )


@pytest.fixture
def tiny_config(tmp_path, datasets) -> TrainConfig:
    """Tiny model at S = 64, 2 epochs of 2 steps of 4 images."""
    return TrainConfig(
        name="test",
        model="tiny",
        data=datasets,
        image_size=64,
        batch_size=4,
        epochs=2,
        steps_per_epoch=2,
        warmup_steps=1,
        checkpoint_every=2,
        log_every=1,
        out_dir=str(tmp_path / "run"),
    )


@pytest.fixture(scope="session")
def dental(tmp_path_factory) -> str:
    """A tiny dataset of a modality no shipped model has, as ``DIR:dental``: blue-tinted, so that it looks
    unlike the others."""
    root = tmp_path_factory.mktemp("new") / "dental"
    return f"{make_dataset(root, seed=3, tint=(0.2, 0.4, 1.0))}:dental"


@pytest.fixture
def start(tmp_path):
    """A tiny checkpoint without controllers, as the bundled weights were shipped."""
    import dataclasses

    import torch

    from espmedsam.checkpoints.native import save_model
    from espmedsam.models.registry import build_model, get_config

    config = dataclasses.replace(
        get_config("tiny"), controller=dataclasses.replace(get_config("tiny").controller, enabled=False)
    )
    torch.manual_seed(1)
    return save_model(build_model(config), tmp_path / "start.safetensors")


@pytest.fixture
def prefix_config(tiny_config, tmp_path):
    """``prefix_config(init, **changes)``: ``tiny_config`` grown from ``init`` and trained on a frozen,
    cached prefix of three stages, as the bundled recipe does."""
    import dataclasses

    def make(init, **changes) -> TrainConfig:
        return dataclasses.replace(
            tiny_config,
            init=str(init),
            model_overrides=GROWN,
            frozen_prefix=3,
            train_shared_suffix=False,
            input_sizes=(64, 64, 64, 32, 64, 64),  # fundus at 32: batches mix two input sizes
            min_cached_samples=8,  # 4 training images per set: 2 variants each
            cache_dir=str(tmp_path / "cache"),
            bf16=False,
            num_workers=0,
            **changes,
        )

    return make
