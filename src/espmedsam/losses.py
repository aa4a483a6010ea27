"""Segmentation losses: Dice + focal on the mask, BCE on the SPPG patch logits (paper-notes §6).

``SegmentationLoss`` = ``MaskLoss`` (0.8 Dice + 0.2 focal, the official hints) + λ ``PatchLoss`` (λ = 0.5):
the self-patch prompt generator's patch logits are trained against the max-pooled mask, so a patch is
positive when any of its pixels is foreground. Losses are computed in float32, also under autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from espmedsam.errors import InputError

__all__ = ["LossParts", "MaskLoss", "PatchLoss", "SegmentationLoss", "mask_divergence"]


@dataclass(frozen=True)
class LossParts:
    """The total loss and its unweighted parts, each a float32 scalar tensor."""

    total: torch.Tensor
    dice: torch.Tensor
    focal: torch.Tensor
    patch: torch.Tensor


class MaskLoss(nn.Module):
    """``dice_weight`` · soft Dice + ``focal_weight`` · sigmoid focal loss of mask logits (MONAI losses).

    Dice is computed per image and averaged over the batch; focal is averaged over all pixels.
    """

    def __init__(self, dice_weight: float = 0.8, focal_weight: float = 0.2, *, gamma: float = 2.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.focal_weight = focal_weight
        self.dice = DiceLoss(sigmoid=True)
        self.focal = FocalLoss(gamma=gamma)

    def parts(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted (Dice loss, focal loss) of (B, 1, H, W) logits against (B, 1, H, W) 0/1 targets.

        Raises:
            InputError: logits and targets of different shapes, or not (B, 1, H, W).
        """
        _check_pair(logits, targets, "mask")
        with torch.autocast(logits.device.type, enabled=False):
            logits, targets = logits.float(), targets.float()
            return self.dice(logits, targets), self.focal(logits, targets)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar float32 weighted loss; see :meth:`parts`."""
        dice, focal = self.parts(logits, targets)
        return self.dice_weight * dice + self.focal_weight * focal


class PatchLoss(nn.Module):
    """BCE-with-logits of SPPG patch logits against the mask max-pooled to the patch grid."""

    def forward(self, patch_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Scalar float32 loss.

        Args:
            patch_logits: (B, 1, S/r, S/r) patch logits (r = 32 for ESP-MedSAM).
            masks: (B, 1, S, S) 0/1 masks; S must be a multiple of the patch grid side.
        Raises:
            InputError: shapes that do not fit (different batch, non-square, or no integer stride).
        """
        _check_pair(patch_logits, masks, "patch", same_size=False)
        side, grid = masks.shape[-1], patch_logits.shape[-1]
        if side % grid or masks.shape[-2] * grid != patch_logits.shape[-2] * side:
            raise InputError(
                f"patch grid {tuple(patch_logits.shape[-2:])} does not divide "
                f"mask size {tuple(masks.shape[-2:])}"
            )
        stride = side // grid
        with torch.autocast(patch_logits.device.type, enabled=False):
            targets = F.max_pool2d(masks.float(), kernel_size=stride, stride=stride)
            return F.binary_cross_entropy_with_logits(patch_logits.float(), targets)


class SegmentationLoss(nn.Module):
    """Mask loss + ``patch_weight`` · patch loss; no patch term for a model without patch logits."""

    def __init__(
        self, mask: MaskLoss | None = None, patch: PatchLoss | None = None, *, patch_weight: float = 0.5
    ) -> None:
        super().__init__()
        self.mask = mask if mask is not None else MaskLoss()
        self.patch = patch if patch is not None else PatchLoss()
        self.patch_weight = patch_weight

    def forward(
        self, mask_logits: torch.Tensor, masks: torch.Tensor, patch_logits: torch.Tensor | None = None
    ) -> LossParts:
        """Loss of (B, 1, S, S) mask logits (and (B, 1, S/32, S/32) patch logits) against 0/1 masks."""
        dice, focal = self.mask.parts(mask_logits, masks)
        total = self.mask.dice_weight * dice + self.mask.focal_weight * focal
        if patch_logits is None:
            patch = torch.zeros((), device=total.device)
        else:
            patch = self.patch(patch_logits, masks)
            total = total + self.patch_weight * patch
        return LossParts(total=total, dice=dice, focal=focal, patch=patch)


def mask_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, focus: float = 0.0
) -> torch.Tensor:
    """Per-pixel KL(teacher || student) of two (B, 1, S, S) mask-logit maps, averaged: zero when they agree.

    With ``focus`` > 0 each image's mean KL is weighted by its share of the batch's disagreement raised to
    ``focus`` (weights of mean 1, not differentiated), so the few images where the masks part ways, a
    lesion found by one and missed by the other, outweigh the many that differ at their borders only.
    """
    target = torch.sigmoid(teacher_logits)
    cross = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    per_image = (cross - entropy).flatten(1).mean(1)
    if focus <= 0:
        return per_image.mean()
    weights = per_image.detach().clamp_min(1e-12) ** focus
    return (weights / weights.mean() * per_image).mean()


def _check_pair(logits: torch.Tensor, targets: torch.Tensor, what: str, *, same_size: bool = True) -> None:
    if logits.ndim != 4 or targets.ndim != 4 or logits.shape[:2] != targets.shape[:2] or logits.shape[1] != 1:
        raise InputError(
            f"{what} loss expects (B, 1, H, W) logits and targets, got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if same_size and logits.shape != targets.shape:
        raise InputError(f"{what} logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
