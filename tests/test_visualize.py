from __future__ import annotations

import numpy as np

from espmedsam.visualize import PRED_COLOUR, TRUTH_COLOUR, contour, overlay


def test_contour_of_square_is_its_border():
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    edge = contour(mask)
    assert edge.sum() == 8 and not edge[3, 3]


def test_overlay_colours_prediction_and_truth():
    image = np.zeros((10, 10), np.uint8)
    pred = np.zeros((10, 10), bool)
    pred[2:8, 2:8] = True
    truth = np.zeros((10, 10), bool)
    truth[0:4, 0:4] = True
    out = overlay(image, pred, truth)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert tuple(out[2, 5]) == PRED_COLOUR
    assert tuple(out[0, 0]) == TRUTH_COLOUR
    assert tuple(out[9, 9]) == (0, 0, 0)
    assert 0 < out[4, 4, 0] < 255  # tinted inside the prediction
