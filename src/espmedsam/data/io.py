"""Image readers: one function per family of formats, each returning an (H, W[, C]) array.

``read_image`` gives uint8 pixels for the model; ``read_mask`` gives a boolean foreground map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from espmedsam.errors import DataError
from espmedsam.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (*IMAGE_SUFFIXES, ".gif")


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image as uint8: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA.

    8-bit images are returned as stored; palette images are expanded to RGB (RGBA with transparency);
    16-bit, 32-bit and float images are rescaled to 0..255 by their own min and max (windowing is the
    caller's).

    Raises:
        DataError: a missing file, an unknown suffix, or a file that cannot be decoded.
    """
    return _read(Path(path), IMAGE_SUFFIXES, _pil_to_array)


def read_mask(path: str | Path, *, threshold: float = 0) -> np.ndarray:
    """Read a 2D mask as an (H, W) bool array: foreground where the stored value is > ``threshold``.

    Values are compared as stored (16-bit and float masks are not rescaled). For RGB(A) masks a pixel is
    foreground when any colour channel is > ``threshold`` (alpha is ignored); palette masks are compared
    through their palette colours. GIF is accepted besides the image formats (DRIVE ships GIF masks).

    Raises:
        DataError: a missing file, an unknown suffix, or a file that cannot be decoded.
    """
    array = read_mask_values(path)
    if array.ndim == 3:
        return (array[..., :3] > threshold).any(axis=-1)
    return array > threshold


def read_mask_values(path: str | Path) -> np.ndarray:
    """Read a mask's values as stored: (H, W) or (H, W, C) of the file's dtype (palette -> RGB colours).

    Raises:
        DataError: a missing file, an unknown suffix, or a file that cannot be decoded.
    """
    return _read(Path(path), MASK_SUFFIXES, _pil_to_raw_array)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (such as ``dataset.json``), as a dict.

    Raises:
        DataError: the file is not valid JSON or holds something other than an object.
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object")
    return data


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (temporary name, then rename)."""
    from PIL import Image

    return atomic_write(path, lambda file: Image.fromarray(array).save(file, format="PNG"))


def _read(path: Path, suffixes: tuple[str, ...], to_array) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in suffixes:
        raise DataError(
            f"{path}: unsupported image type {path.suffix!r}; expected one of {', '.join(suffixes)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            array = to_array(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from None
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(f"{path}: expected a 2D image, got an array of shape {array.shape}")
    return array


def _pil_to_array(image) -> np.ndarray:
    if image.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "1"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    return _rescale_to_uint8(array.astype(np.float64))


def _pil_to_raw_array(image) -> np.ndarray:
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "LAB"):
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    return np.asarray(image)


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) / (high - low) * 255).astype(np.uint8)
