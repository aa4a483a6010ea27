"""Segmentation metrics: pure functions on one binary mask pair ``(H, W)`` -> ``float`` (paper-notes §7).

Dice and IoU are counted here; the Hausdorff distance (HD95) and the normalised surface Dice (NSD) are
computed by MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice`` on the masks' edge pixels.
Distances are in pixels, or in the units of ``spacing`` (row, column) when it is given.

Empty-mask rule (the one place it is stated):

- both masks empty: Dice = IoU = 1 (nothing to find, nothing found); HD95 = NSD = NaN;
- exactly one mask empty: Dice = IoU = 0; HD95 = NSD = NaN;
- ``summarise`` skips NaN values and counts them in ``n_skipped``, so HD95 and NSD are averaged over the
  images where both masks have foreground, and the number left out is always reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from espmedsam.errors import InputError

__all__ = ["MetricSummary", "dice", "hd95", "iou", "nsd", "segmentation_metrics", "summarise"]

Spacing = float | tuple[float, float] | None
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "nsd")


@dataclass(frozen=True)
class MetricSummary:
    """Aggregate of one metric over images: mean and (population) std of the finite values."""

    mean: float
    std: float
    n: int
    n_skipped: int


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of two (H, W) binary masks; 1 when both are empty.

    Raises:
        InputError: masks that are not 2D or differ in shape.
    """
    pred, truth = _pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union |P∩T| / |P∪T| of two (H, W) binary masks; 1 when both are empty.

    Raises:
        InputError: masks that are not 2D or differ in shape.
    """
    pred, truth = _pair(pred, truth)
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


def hd95(pred: np.ndarray, truth: np.ndarray, *, spacing: Spacing = None, percentile: float = 95.0) -> float:
    """Symmetric Hausdorff distance at ``percentile`` (95: HD95, 100: the classic maximum) between edges.

    Returns NaN when either mask is empty.

    Raises:
        InputError: masks that are not 2D or differ in shape, or a percentile outside [0, 100].
    """
    pred, truth = _pair(pred, truth)
    if not 0.0 <= percentile <= 100.0:
        raise InputError(f"Hausdorff percentile must lie in [0, 100], got {percentile}")
    if not pred.any() or not truth.any():
        return math.nan
    from monai.metrics import compute_hausdorff_distance

    with _quiet_monai():
        value = compute_hausdorff_distance(
            _one_hot(pred),
            _one_hot(truth),
            include_background=True,
            percentile=None if percentile == 100.0 else percentile,
            spacing=spacing,
        )
    return float(value.item())


def nsd(pred: np.ndarray, truth: np.ndarray, *, tolerance: float = 2.0, spacing: Spacing = None) -> float:
    """Normalised surface Dice: the share of both masks' edge pixels within ``tolerance`` of the other edge.

    Returns NaN when either mask is empty.

    Raises:
        InputError: masks that are not 2D or differ in shape, or a negative tolerance.
    """
    pred, truth = _pair(pred, truth)
    if tolerance < 0:
        raise InputError(f"NSD tolerance must be >= 0, got {tolerance}")
    if not pred.any() or not truth.any():
        return math.nan
    from monai.metrics import compute_surface_dice

    with _quiet_monai():
        value = compute_surface_dice(
            _one_hot(pred), _one_hot(truth), [float(tolerance)], include_background=True, spacing=spacing
        )
    return float(value.item())


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    tolerance: float = 2.0,
    percentile: float = 95.0,
    spacing: Spacing = None,
) -> dict[str, float]:
    """``{"dice", "iou", "hd95", "nsd"}`` of one (H, W) mask pair; "hd95" is at ``percentile``.

    Raises:
        InputError: as ``dice``, ``hd95`` and ``nsd``.
    """
    return {
        "dice": dice(pred, truth),
        "iou": iou(pred, truth),
        "hd95": hd95(pred, truth, spacing=spacing, percentile=percentile),
        "nsd": nsd(pred, truth, tolerance=tolerance, spacing=spacing),
    }


def summarise(values: Sequence[float]) -> MetricSummary:
    """Mean and population std of the finite values; NaN (undefined) values are skipped and counted.

    With no finite value, mean and std are NaN and ``n`` is 0.
    """
    array = np.asarray(list(values), dtype=np.float64)
    finite = array[~np.isnan(array)]
    if finite.size == 0:
        return MetricSummary(math.nan, math.nan, 0, int(array.size))
    return MetricSummary(
        float(finite.mean()), float(finite.std()), int(finite.size), int(array.size - finite.size)
    )


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.ndim != 2 or pred.shape != truth.shape:
        raise InputError(
            f"metrics need two (H, W) masks of the same shape, got {pred.shape} and {truth.shape}"
        )
    return pred, truth


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(H, W) bool -> (1, 1, H, W) bool: one batch item, one foreground channel."""
    return torch.from_numpy(np.ascontiguousarray(mask))[None, None]


class _quiet_monai(warnings.catch_warnings):
    """Silence MONAI's internal deprecation notice (``always_return_as_numpy``), which it emits per call."""

    def __enter__(self):
        result = super().__enter__()
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        return result


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) of tubular masks: the harmonic mean of the fraction of the
    predicted skeleton inside the truth and of the true skeleton inside the prediction. Skeletons by
    scikit-image (``pip install scikit-image``); the empty-mask rule of :func:`dice`."""
    pred, truth = _pair(pred, truth)
    if not pred.any() or not truth.any():
        return float(pred.any() == truth.any())
    skeletonize = _skeletonize()
    pred_skeleton, true_skeleton = skeletonize(pred), skeletonize(truth)
    precision = (pred_skeleton & truth).sum() / max(pred_skeleton.sum(), 1)
    sensitivity = (true_skeleton & pred).sum() / max(true_skeleton.sum(), 1)
    total = precision + sensitivity
    return float(2 * precision * sensitivity / total) if total else 0.0


def thin_recall(pred: np.ndarray, truth: np.ndarray, *, max_width: float = 3.0) -> float:
    """Recall of thin structures: the fraction of the true skeleton's pixels where the truth is at most
    ``max_width`` pixels wide (twice the distance to the background) that the prediction covers; NaN
    when the truth has no such pixel."""
    from scipy.ndimage import distance_transform_edt

    pred, truth = _pair(pred, truth)
    width = 2 * distance_transform_edt(truth)
    thin = _skeletonize()(truth) & (width <= max_width)
    return float((thin & pred).sum() / thin.sum()) if thin.any() else math.nan


def _skeletonize():
    try:
        from skimage.morphology import skeletonize
    except ImportError:
        raise InputError(
            "clDice and thin-vessel recall need scikit-image: pip install scikit-image"
        ) from None
    return skeletonize


LOW_DICE = 0.5  # a mask below this Dice counts as a failure


@dataclass(frozen=True)
class QualityAgreement:
    """How well predicted Dice ranks true Dice on a set of masks."""

    images: int
    spearman: float  # rank correlation of predicted and true Dice; NaN when either is constant
    auroc: float  # of flagging true Dice below ``LOW_DICE`` by low predicted Dice; NaN without both kinds
    failures: int  # masks with true Dice below ``LOW_DICE``
    flagged: int  # masks with predicted Dice below the review threshold
    caught: int  # failures among the flagged


def agreement(predicted: np.ndarray, dice: np.ndarray, review_below: float) -> QualityAgreement:
    """Spearman correlation and failure AUROC of ``predicted`` against true ``dice`` (both (N,))."""
    predicted, dice = np.asarray(predicted, float), np.asarray(dice, float)
    failed = dice < LOW_DICE
    flagged = predicted < review_below
    rho = float("nan")
    if len(dice) > 1 and np.ptp(predicted) > 0 and np.ptp(dice) > 0:
        rho = float(stats.spearmanr(predicted, dice).statistic)
    auroc = float("nan")
    if failed.any() and (~failed).any():  # Mann-Whitney: P(a failure scores below a success)
        ranks = stats.rankdata(-predicted)
        n_fail, n_ok = int(failed.sum()), int((~failed).sum())
        auroc = (ranks[failed].sum() - n_fail * (n_fail + 1) / 2) / (n_fail * n_ok)
    return QualityAgreement(
        len(dice), rho, float(auroc), int(failed.sum()), int(flagged.sum()), int((failed & flagged).sum())
    )
