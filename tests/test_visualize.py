from __future__ import annotations

import numpy as np
import pytest

from espmedsam.visualize import (
    CAPTION_HEIGHT,
    PRED_COLOUR,
    TRUTH_COLOUR,
    caption,
    contour,
    montage,
    overlay,
    overlay_tile,
)


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


def test_montage_places_tiles_row_by_row_with_gaps():
    tiles = [np.full((4, 6, 3), value, np.uint8) for value in (10, 20, 30)]
    out = montage(tiles, columns=2, gap=1)
    assert out.shape == (2 * 4 + 1, 2 * 6 + 1, 3)
    assert (out[:4, :6] == 10).all() and (out[:4, 7:] == 20).all() and (out[5:, :6] == 30).all()
    assert (out[4] == 0).all() and (out[5:, 7:] == 0).all()  # gap row and the empty cell stay black


def test_montage_with_captions_adds_a_text_strip_under_each_tile():
    tiles = [np.full((32, 64, 3), 100, np.uint8), np.full((32, 64, 3), 50, np.uint8)]
    out = montage(tiles, columns=2, gap=2, captions=["a", "b  Dice 0.10"])
    assert out.shape == (32 + CAPTION_HEIGHT, 2 * 64 + 2, 3)
    assert (out[:32, :64] == 100).all() and (out[:32, 66:] == 50).all()
    inked = [(strip > 127).all(axis=-1).sum() for strip in (out[32:, :64], out[32:, 66:])]
    assert 0 < inked[0] < inked[1]  # light text on black; the longer caption has more of it
    with pytest.raises(ValueError, match="captions"):
        montage(tiles, captions=["only one"])


def test_caption_cuts_text_wider_than_the_tile():
    tile = np.zeros((8, 30, 3), np.uint8)
    out = caption(tile, "a_very_long_file_stem_that_cannot_fit  Dice 0.123")
    assert out.shape == (8 + CAPTION_HEIGHT, 30, 3)
    assert not out[8:, -2:].any()  # the text stops short of the right border


def test_overlay_tile_keeps_aspect_and_pads():
    image = np.full((40, 80, 3), 100, np.uint8)
    pred = np.zeros((40, 80), bool)
    pred[10:30, 10:30] = True
    truth = np.zeros((40, 80), bool)
    truth[10:30, 50:70] = True
    tile = overlay_tile(image, pred, truth, side=64)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    assert not tile[:16].any() and not tile[48:].any()  # 32 rows of picture, centred, padded black
    assert (tile[16:48] == 100).all(axis=-1).any()
    assert (tile == PRED_COLOUR).all(axis=-1).any() and (tile == TRUTH_COLOUR).all(axis=-1).any()
