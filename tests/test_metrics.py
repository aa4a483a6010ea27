from __future__ import annotations

import math

import numpy as np
import pytest

from espmedsam.errors import InputError
from espmedsam.metrics import MetricSummary, dice, hd95, iou, nsd, segmentation_metrics, summarise


def _square(top: int, left: int, side: int = 5, shape: tuple[int, int] = (30, 40)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_identical_masks():
    mask = _square(5, 5)
    assert segmentation_metrics(mask, mask) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}


def test_dice_and_iou_by_hand():
    pred, truth = _square(5, 5), _square(5, 6)  # 5x5 squares overlapping in 5x4 pixels
    assert dice(pred, truth) == pytest.approx(2 * 20 / 50)
    assert iou(pred, truth) == pytest.approx(20 / 30)


def test_disjoint_squares_at_known_distance():
    # columns 5..9 and 15..19: every edge pixel's nearest edge on the other square is 6..10 px away,
    # and 10 px for the two far sides (5 + 5 of 16 edge pixels each), so HD95 = HD100 = 10
    pred, truth = _square(5, 5), _square(5, 15)
    assert hd95(pred, truth) == pytest.approx(10.0)
    assert hd95(pred, truth, percentile=100.0) == pytest.approx(10.0)
    assert nsd(pred, truth) == 0.0
    assert dice(pred, truth) == 0.0 and iou(pred, truth) == 0.0


def test_one_pixel_shift_is_within_two_pixel_tolerance():
    pred, truth = _square(5, 5), _square(6, 6)  # one pixel down and one right
    assert nsd(pred, truth, tolerance=2.0) == 1.0
    assert nsd(pred, truth, tolerance=0.0) < 1.0
    # the corner (5, 5) is sqrt(2) from the other square's corner (6, 6), its nearest edge pixel
    assert hd95(pred, truth, percentile=100.0) == pytest.approx(math.sqrt(2))


def test_percentile_100_sees_an_outlier_that_95_ignores():
    truth = _square(5, 5, side=10, shape=(40, 40))
    pred = truth.copy()
    pred[35, 35] = True  # one stray pixel, 21 px down and right of the corner (14, 14)
    assert hd95(pred, truth) == pytest.approx(0.0)
    assert hd95(pred, truth, percentile=100.0) == pytest.approx(math.hypot(21, 21))


def test_anisotropic_spacing_scales_each_axis():
    pred, truth = _square(5, 5), _square(5, 15)  # 10 px apart along columns
    assert hd95(pred, truth, spacing=(1.0, 0.5)) == pytest.approx(5.0)
    assert hd95(pred, truth, spacing=(3.0, 1.0)) == pytest.approx(10.0)
    below = _square(15, 5)  # 10 px apart along rows
    assert hd95(pred, below, spacing=(3.0, 1.0)) == pytest.approx(30.0)
    # 1 px along columns is 3 units: outside a tolerance of 2 units
    shifted = _square(5, 6)
    assert nsd(pred, shifted, tolerance=2.0, spacing=(1.0, 3.0)) < 1.0
    assert nsd(pred, shifted, tolerance=3.0, spacing=(1.0, 3.0)) == 1.0


def test_both_empty():
    empty = np.zeros((8, 9), dtype=bool)
    values = segmentation_metrics(empty, empty)
    assert values["dice"] == 1.0 and values["iou"] == 1.0
    assert math.isnan(values["hd95"]) and math.isnan(values["nsd"])


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_one_empty(which):
    mask, empty = _square(2, 2, shape=(12, 12)), np.zeros((12, 12), dtype=bool)
    pred, truth = (empty, mask) if which == "pred" else (mask, empty)
    values = segmentation_metrics(pred, truth)
    assert values["dice"] == 0.0 and values["iou"] == 0.0
    assert math.isnan(values["hd95"]) and math.isnan(values["nsd"])


def test_accepts_uint8_masks():
    mask = _square(5, 5).astype(np.uint8) * 255
    assert dice(mask, mask) == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: dice(np.zeros((4, 4)), np.zeros((4, 5))),
        lambda: iou(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))),
        lambda: hd95(_square(1, 1), _square(1, 1), percentile=101.0),
        lambda: nsd(_square(1, 1), _square(1, 1), tolerance=-1.0),
    ],
)
def test_bad_input_raises_input_error(call):
    with pytest.raises(InputError):
        call()


def test_summarise_skips_and_counts_nan():
    summary = summarise([1.0, math.nan, 3.0, math.nan])
    assert summary == MetricSummary(mean=2.0, std=1.0, n=2, n_skipped=2)


def test_summarise_of_nothing_defined():
    summary = summarise([math.nan])
    assert math.isnan(summary.mean) and math.isnan(summary.std)
    assert (summary.n, summary.n_skipped) == (0, 1)
    assert summarise([]).n == 0


def test_cldice_of_lines():
    from espmedsam.metrics import cldice

    truth = np.zeros((32, 32), bool)
    truth[10, 2:30] = True  # one 1-px vessel
    assert cldice(truth, truth) == pytest.approx(1.0)
    half = truth.copy()
    half[10, 16:] = False  # half of it found
    assert 0.5 < cldice(half, truth) < 1.0
    thick = np.zeros_like(truth)
    thick[8:13, 2:30] = True  # a wide blob over the vessel: its skeleton is still inside the truth? no
    assert cldice(thick, truth) < 1.0
    assert cldice(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert cldice(np.zeros_like(truth), truth) == 0.0


def test_thin_recall_counts_thin_parts_only():
    from espmedsam.metrics import thin_recall

    truth = np.zeros((40, 40), bool)
    truth[5, 2:38] = True  # thin
    truth[20:30, 2:38] = True  # wide: not counted
    found = np.zeros_like(truth)
    found[20:30, 2:38] = True
    assert thin_recall(found, truth) == 0.0
    assert thin_recall(truth, truth) == 1.0
    assert np.isnan(thin_recall(found, found))
