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

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

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

# (N, 4) boxes (x0, y0, x1, y1) in model-input pixels and the (N,) image each belongs to ->
# ((N, 1, S, S) prompted mask logits, (N,) predicted IoU)
BoxDecoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MaskQuality(nn.Module):
    """Quality features of prompt-free masks -> predicted Dice.

    Args:
        num_modalities: one bias per modality.
        max_components: the largest components of a mask whose boxes are decoded for ``box_agreement``.
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
        decode_boxes: BoxDecoder | None,
    ) -> torch.Tensor:
        """(B, 1, S, S) mask logits, (B, 1, g, g) SPPG patch logits, each image's unpadded (h, w) in model
        input pixels and a box decoder (None: no promptable decoder; box features 0) -> (B, F) features."""
        size = mask_logits.shape[-1]
        probabilities = mask_logits.float().sigmoid()
        patches = nn.functional.interpolate(patch_logits.float(), size=(size, size), mode="nearest") > 0
        rows, boxes, owners = [], [], []
        for i, (h, w) in enumerate(valid_sizes):
            p = probabilities[i, 0, :h, :w]
            mask = p > 0.5
            components, count = _largest_components(mask.cpu().numpy(), self.max_components)
            boxes += [box for box, _ in components]
            owners += [i] * len(components)
            rows.append((p, mask, patches[i, 0, :h, :w], components, count))
        prompted = _decode(decode_boxes, boxes, owners, mask_logits.device)
        out, k = [], 0
        for p, mask, patch_mask, components, count in rows:
            agreement, iou = _box_features(components, prompted, k)
            k += len(components)
            out.append(_image_features(p, mask, patch_mask, agreement, iou, count))
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


def _largest_components(mask: np.ndarray, limit: int) -> tuple[list, int]:
    """The ``limit`` largest connected components of a bool mask, each ((x0, y0, x1, y1) inclusive, its
    own pixels inside that box), and the number of components."""
    labels, count = ndimage.label(mask)
    if not count:
        return [], 0
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    slices = ndimage.find_objects(labels)
    out = []
    for index in np.argsort(-sizes, kind="stable")[:limit]:
        rows, columns = slices[index]
        box = (columns.start, rows.start, columns.stop - 1, rows.stop - 1)
        out.append((box, labels[rows, columns] == index + 1))
    return out, count


def _decode(
    decode_boxes: BoxDecoder | None, boxes: list, owners: list[int], device: torch.device
) -> tuple[np.ndarray, np.ndarray] | None:
    if decode_boxes is None or not boxes:
        return None
    box_tensor = torch.tensor(boxes, dtype=torch.float32, device=device)
    logits, iou = decode_boxes(box_tensor, torch.tensor(owners, device=device))
    return (logits.float() > 0).cpu().numpy(), iou.float().cpu().numpy()


def _box_features(
    components: list, prompted: tuple[np.ndarray, np.ndarray] | None, first: int
) -> tuple[float, float]:
    """The area-weighted Dice of each component with its box's prompted mask inside the box, and the
    passes' mean predicted IoU; (0, 0) without passes."""
    if prompted is None or not components:
        return 0.0, 0.0
    masks, ious = prompted
    areas, dices = [], []
    for j, ((x0, y0, x1, y1), own) in enumerate(components):
        decoded = masks[first + j, 0, y0 : y1 + 1, x0 : x1 + 1]
        areas.append(float(own.sum()))
        dices.append(2 * float((own & decoded).sum()) / (areas[-1] + float(decoded.sum())))
    return float(np.average(dices, weights=areas)), float(ious[first : first + len(components)].mean())
