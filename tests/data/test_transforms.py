from __future__ import annotations

import numpy as np
import pytest
import torch

from espmedsam.data.transforms import to_model_input, train_augmentation
from espmedsam.errors import InputError

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _pair(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[h // 4 : h // 2, w // 3 : w // 2] = True
    return image, mask


@pytest.mark.parametrize("h, w, size", [(40, 70, 64), (50, 30, 32), (20, 24, 64), (64, 64, 64)])
def test_matches_model_preprocess(tiny_model, h, w, size):
    image, mask = _pair(h, w)
    x, m, valid = to_model_input(image, mask, size, tiny_model.config.pixel_mean, tiny_model.config.pixel_std)
    expected, meta = tiny_model.preprocess(image, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert torch.allclose(x, expected[0], atol=1e-4)
    assert valid == meta.resized_size
    assert m.shape == (1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[:, valid[0] :, :].sum() == 0 and m[:, :, valid[1] :].sum() == 0


def test_mask_follows_image_nearest():
    image, mask = _pair(32, 16)
    _, m, valid = to_model_input(image, mask, 64, MEAN, STD)
    assert valid == (64, 32)
    assert torch.equal(
        m[0, :64, :32], torch.from_numpy(mask).float().repeat_interleave(2, 0).repeat_interleave(2, 1)
    )


def test_input_errors():
    image, mask = _pair(10, 10)
    with pytest.raises(InputError, match="uint8"):
        to_model_input(image.astype(np.float32), mask, 32, MEAN, STD)
    with pytest.raises(InputError, match="differs"):
        to_model_input(image, mask[:5], 32, MEAN, STD)


def test_augmentation_moves_image_and_mask_together():
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    image[5:15, 10:30] = 200
    mask[5:15, 10:30] = 1
    aug = train_augmentation(30, seed=0)
    for _ in range(5):
        out = aug(image=image, mask=mask)
        assert out["image"].shape == (20, 30, 3) and out["mask"].shape == (20, 30)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 1}
        bright, fg = out["image"].max(axis=-1) > 100, out["mask"] > 0
        assert (bright & fg).sum() >= 0.8 * fg.sum() > 0


def test_augmentation_is_reproducible_and_varied():
    image, mask = _pair(24, 32)
    first = [train_augmentation(32, seed=7)(image=image, mask=mask.astype(np.uint8)) for _ in range(2)]
    assert np.array_equal(first[0]["image"], first[1]["image"])
    aug = train_augmentation(32, seed=7)
    draws = [aug(image=image, mask=mask.astype(np.uint8))["image"] for _ in range(3)]
    assert np.array_equal(draws[0], first[0]["image"])
    assert not np.array_equal(draws[0], draws[1])


def test_zoomed_crops_are_square_aligned_and_widen_thin_lines():
    image = np.zeros((320, 320, 3), np.uint8)
    mask = np.zeros((320, 320), np.uint8)
    image[:, 150:160] = 255  # a 10 px line: 1 px at the unzoomed side of 32, 1.25-2 px when zoomed
    mask[:, 150:160] = 1
    zoomed, whole = train_augmentation(32, seed=1, zoom_probability=1.0), train_augmentation(32, seed=1)

    def mean_width(aug) -> float:
        widths = []
        for _ in range(30):
            out = aug(image=image, mask=mask)
            assert out["image"].shape == (32, 32, 3) and out["mask"].shape == (32, 32)
            fg = out["mask"] > 0
            assert (out["image"].max(axis=-1)[fg] > 60).mean() >= 0.8 if fg.any() else True
            rows = fg.any(axis=1)
            widths += list(fg.sum(axis=1)[rows])
        return float(np.mean(widths))

    assert mean_width(zoomed) > 1.1 * mean_width(whole)  # seeded, so deterministic
    half = train_augmentation(32, seed=2, zoom_probability=0.5)
    wide = np.zeros((24, 32, 3), np.uint8)
    shapes = {half(image=wide, mask=wide[..., 0])["image"].shape for _ in range(20)}
    assert shapes == {(32, 32, 3), (24, 32, 3)}  # zoomed crops and whole images both occur
    with pytest.raises(InputError, match="zoom"):
        train_augmentation(32, zoom_probability=1.5)
