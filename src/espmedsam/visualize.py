"""Pictures people look at: masks drawn over their images, tiles and montages of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import ImageDraw

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


def montage(
    tiles: Sequence[np.ndarray],
    columns: int | None = None,
    gap: int = 2,
    *,
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """Equal-size (H, W, 3) uint8 tiles -> one (rows*H, columns*W, 3) picture, row by row, black gaps;
    ``columns`` defaults to a near-square grid. With ``captions`` (one per tile) each tile first gets a
    caption strip below it (see ``caption``).

    Raises:
        ValueError: no tile, or not one caption per tile.
    """
    if not tiles:
        raise ValueError("montage needs at least one tile")
    if captions is not None:
        if len(captions) != len(tiles):
            raise ValueError(f"montage got {len(tiles)} tiles but {len(captions)} captions")
        tiles = [caption(tile, text) for tile, text in zip(tiles, captions, strict=True)]
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    h, w = tiles[0].shape[:2]
    out = np.zeros((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = _as_rgb(tile)
    return out


CAPTION_HEIGHT = 16  # pixels of the strip under a captioned tile


def overlay_tile(
    image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None, side: int = 256
) -> np.ndarray:
    """``overlay`` drawn at tile size: (side, side, 3) uint8, the long side ``side``, aspect kept, padded
    black. Image and masks are resized first (bilinear, nearest), so the outlines stay 1 px thin."""
    height, width = prediction.shape
    scale = side / max(height, width)
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    small_truth = None if truth is None else _resized(truth, shape, nearest=True)
    picture = overlay(_resized(_as_rgb(image), shape), _resized(prediction, shape, nearest=True), small_truth)
    return _pad(picture, side)


def caption(tile: np.ndarray, text: str, height: int = CAPTION_HEIGHT) -> np.ndarray:
    """(H, W, 3) uint8 -> (H + height, W, 3): a black strip below with ``text`` in white, drawn with
    PIL's default font; text wider than the tile is cut and ends in "..."."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (tile.shape[1], height))
    draw = ImageDraw.Draw(strip)
    draw.text((2, 2), _fit_text(draw, text, tile.shape[1] - 4), fill=(255, 255, 255))
    return np.concatenate([_as_rgb(tile), np.asarray(strip)], axis=0)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """``text``, or its longest prefix followed by "..." that ``draw``'s font fits into ``width`` px."""
    if draw.textlength(text) <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        if draw.textlength(text[:end] + "...") <= width:
            return text[:end] + "..."
    return "..."


def _resized(array: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W[, 3]) uint8 or bool -> ``shape`` (rows, columns), same dtype, by PIL."""
    from PIL import Image

    if array.shape[:2] == shape:
        return array
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    data = array.astype(np.uint8) * 255 if array.dtype == bool else np.ascontiguousarray(array, np.uint8)
    picture = Image.fromarray(data)
    out = np.asarray(picture.resize((shape[1], shape[0]), resample))
    return out > 127 if array.dtype == bool else out


def _pad(picture: np.ndarray, side: int) -> np.ndarray:
    """Centre an (h, w, 3) picture, h and w at most ``side``, on a black (side, side, 3) canvas."""
    out = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - picture.shape[0]) // 2, (side - picture.shape[1]) // 2
    out[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    return out
