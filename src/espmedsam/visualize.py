"""Pictures people look at: masks drawn over their images."""

from __future__ import annotations

import numpy as np

PRED_COLOUR = (255, 64, 32)
TRUTH_COLOUR = (32, 224, 64)


def contour(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: mask pixels with a 4-neighbour outside the mask."""
    mask = mask.astype(bool)
    padded = np.pad(mask, 1, mode="constant")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 picture: prediction tinted and outlined, ground truth (if given) outlined in green.

    Args:
        image: (H, W) or (H, W, C) uint8.
        prediction: (H, W) bool.
        truth: optional (H, W) bool.
    """
    rgb = _as_rgb(image).astype(np.float32)
    pred = prediction.astype(bool)
    rgb[pred] = 0.65 * rgb[pred] + 0.35 * np.array(PRED_COLOUR, np.float32)
    rgb[_thick(contour(pred))] = PRED_COLOUR
    if truth is not None:
        rgb[_thick(contour(truth))] = TRUTH_COLOUR
    return rgb.round().astype(np.uint8)


def _thick(edge: np.ndarray) -> np.ndarray:
    """Dilate a 1-px edge to 2 px on images larger than 256 px, so it stays visible."""
    if max(edge.shape) <= 256:
        return edge
    out = edge.copy()
    out[1:] |= edge[:-1]
    out[:, 1:] |= edge[:, :-1]
    return out


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[..., :3]


def montage(tiles: list[np.ndarray], columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Equal-size (H, W, 3) uint8 tiles -> one (rows*H, columns*W, 3) picture, row by row, black gaps;
    ``columns`` defaults to a near-square grid."""
    if not tiles:
        raise ValueError("montage needs at least one tile")
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    h, w = tiles[0].shape[:2]
    out = np.zeros((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = _as_rgb(tile)
    return out
