"""The quality score of a prompt-free mask: its predicted Dice, so a person reviews the likely failures first.

A prompt-free mask fails by taking the wrong structure or nothing; its own logits can look confident
either way. What gives a failure away is disagreement between the model's views of the same embedding,
so the score reads (``QUALITY_FEATURES``):

- ``self_dice``: the soft Dice of the mask probabilities with their own threshold (low where much of the
  mask is near 0.5);
- ``uncertain_share``: pixels with a probability in (0.1, 0.9), over those and the mask's;
- ``patch_agreement``: Dice of the mask with SPPG's coarse patch map (``patch_logits > 0``);
- ``box_agreement`` and ``predicted_iou``: the bounding box of each of the mask's largest components
  (``max_components``) is decoded by the promptable decoder (LiteMedSAM's, trained on box prompts), and
  its mask compared with the component's within the box, area-weighted; beside it SAM's IoU head's
  estimate for those passes;
- ``log_area`` and ``log_components``: the mask's share of the image and its number of parts;
- ``empty``: nothing found.

``MaskQuality`` is a logistic model on these: standardised features, shared weights and one bias per
modality, sigmoid -> predicted Dice in [0, 1]. Its parameters are fitted on validation splits
(``espmedsam quality calibrate``, ``train/quality.py``); uncalibrated, it says nothing (``calibrated``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from espmedsam.models.self_prompt import SelfPrompts

QUALITY_FEATURES = (
    "self_dice",
    "uncertain_share",
    "patch_agreement",
    "box_agreement",
    "predicted_iou",
    "log_area",
    "log_components",
    "empty",
)
DEFAULT_REVIEW_BELOW = 0.5  # predicted Dice under which a mask is flagged for review


class MaskQuality(nn.Module):
    """Quality features of prompt-free masks -> predicted Dice.

    Args:
        num_modalities: one bias per modality.
        max_components: the largest components of a mask whose boxes are decoded for ``box_agreement``
            (and for ``--refine self``).
    """

    def __init__(self, num_modalities: int, max_components: int = 3) -> None:
        super().__init__()
        self.max_components = max_components
        n = len(QUALITY_FEATURES)
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_scale", torch.ones(n))
        self.register_buffer("weight", torch.zeros(n))
        self.register_buffer("modality_bias", torch.zeros(num_modalities))
        self.register_buffer("review_below", torch.tensor(DEFAULT_REVIEW_BELOW))
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def is_calibrated(self) -> bool:
        return bool(self.calibrated)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, F) features and (B,) modality ids -> (B,) predicted Dice in [0, 1]."""
        z = (features.float() - self.feature_mean) / self.feature_scale
        return torch.sigmoid(z @ self.weight + self.modality_bias[ids])

    @torch.no_grad()
    def features(
        self,
        mask_logits: torch.Tensor,
        patch_logits: torch.Tensor,
        valid_sizes: Sequence[tuple[int, int]],
        prompts: SelfPrompts,
    ) -> torch.Tensor:
        """(B, 1, S, S) mask logits, (B, 1, g, g) SPPG patch logits, each image's unpadded (h, w) in model
        input pixels and the boxes of its largest components as the promptable decoder saw them
        (``models/self_prompt.py``; without a decoder the box features are 0) -> (B, F) features."""
        size = mask_logits.shape[-1]
        probabilities = mask_logits.float().sigmoid().cpu()
        patches = nn.functional.interpolate(patch_logits.float(), size=(size, size), mode="nearest") > 0
        out = []
        for i, (h, w) in enumerate(valid_sizes):
            p = probabilities[i, 0, :h, :w]
            agreement, iou = _box_features(prompts.of_image(i))
            out.append(
                _image_features(p, p > 0.5, patches[i, 0, :h, :w].cpu(), agreement, iou, prompts.counts[i])
            )
        return torch.tensor(out, dtype=torch.float32)


def _image_features(
    p: torch.Tensor, mask: torch.Tensor, patch_mask: torch.Tensor, agreement: float, iou: float, parts: int
) -> list[float]:
    area, pixels = float(mask.sum()), mask.numel()
    soft = float((p * mask).sum())
    self_dice = 2 * soft / (float(p.sum()) + area) if area else 0.0
    uncertain = float(((p > 0.1) & (p < 0.9)).sum())
    patch_total = area + float(patch_mask.sum())
    patch_agreement = 2 * float((mask & patch_mask).sum()) / patch_total if patch_total else 1.0
    return [
        self_dice,
        uncertain / (uncertain + area + 1.0),
        patch_agreement,
        agreement,
        iou,
        float(np.log(area / pixels + 1e-4)),
        float(np.log1p(parts)),
        0.0 if area else 1.0,
    ]


def _box_features(decoded: list) -> tuple[float, float]:
    """The area-weighted Dice of each component with its box's prompted mask inside the box, and the
    passes' mean predicted IoU; (0, 0) without passes."""
    if not decoded:
        return 0.0, 0.0
    areas, dices, ious = [], [], []
    for component, logits, iou in decoded:
        x0, y0, x1, y1 = component.box
        inside = (logits[y0 : y1 + 1, x0 : x1 + 1] > 0).numpy()
        own = component.pixels
        areas.append(float(own.sum()))
        dices.append(2 * float((own & inside).sum()) / (areas[-1] + float(inside.sum())))
        ious.append(iou)
    return float(np.average(dices, weights=areas)), float(np.mean(ious))
