from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

from espmedsam.errors import InputError
from espmedsam.losses import MaskLoss, PatchLoss, SegmentationLoss


def _batch(side: int = 64, grid: int = 2):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, side, side, generator=generator)
    masks = (torch.rand(2, 1, side, side, generator=generator) > 0.8).float()
    patch_logits = torch.randn(2, 1, grid, grid, generator=generator)
    return logits, masks, patch_logits


def test_mask_loss_is_weighted_monai_dice_and_focal():
    logits, masks, _ = _batch()
    expected = 0.8 * DiceLoss(sigmoid=True)(logits, masks) + 0.2 * FocalLoss()(logits, masks)
    assert torch.allclose(MaskLoss()(logits, masks), expected)
    assert torch.allclose(MaskLoss(1.0, 0.0)(logits, masks), DiceLoss(sigmoid=True)(logits, masks))


def test_mask_loss_is_small_for_a_confident_correct_prediction():
    _, masks, _ = _batch()
    good, bad = MaskLoss()(20 * (2 * masks - 1), masks), MaskLoss()(-20 * (2 * masks - 1), masks)
    assert good < 0.01 < 0.5 < bad


def test_patch_loss_targets_the_max_pooled_mask():
    masks = torch.zeros(1, 1, 64, 64)
    masks[0, 0, 40, 5] = 1  # one pixel makes patch (1, 0) positive
    target = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]])
    patch_logits = torch.randn(1, 1, 2, 2)
    expected = F.binary_cross_entropy_with_logits(patch_logits, target)
    assert torch.allclose(PatchLoss()(patch_logits, masks), expected)


@pytest.mark.parametrize("side, grid", [(64, 2), (96, 3), (256, 8)])
def test_losses_at_several_sizes(side, grid):
    logits, masks, patch_logits = _batch(side, grid)
    parts = SegmentationLoss()(logits, masks, patch_logits)
    expected = 0.8 * parts.dice + 0.2 * parts.focal + 0.5 * parts.patch
    assert torch.allclose(parts.total, expected) and parts.patch > 0


def test_without_patch_logits_the_patch_term_is_zero():
    logits, masks, _ = _batch()
    parts = SegmentationLoss()(logits, masks)
    assert parts.patch == 0 and torch.allclose(parts.total, MaskLoss()(logits, masks))


def test_losses_are_float32_under_bfloat16_autocast_and_give_gradients():
    logits, masks, patch_logits = _batch()
    logits = logits.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = SegmentationLoss()(logits, masks, patch_logits.bfloat16())
    assert all(t.dtype == torch.float32 for t in (parts.total, parts.dice, parts.focal, parts.patch))
    parts.total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logits, targets, message",
    [
        (torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 16, 16), "differ"),
        (torch.zeros(2, 8, 8), torch.zeros(2, 8, 8), r"\(B, 1, H, W\)"),
        (torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), r"\(B, 1, H, W\)"),
    ],
)
def test_mask_loss_rejects_bad_shapes(logits, targets, message):
    with pytest.raises(InputError, match=message):
        MaskLoss()(logits, targets)


def test_patch_loss_rejects_a_grid_that_does_not_divide_the_mask():
    with pytest.raises(InputError, match="does not divide"):
        PatchLoss()(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 64, 64))
