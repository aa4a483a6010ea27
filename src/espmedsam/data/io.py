"""Image readers: one function per family of formats, each returning an (H, W[, C]) uint8 array."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from espmedsam.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image as uint8: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA.

    16-bit and float images are rescaled to 0..255 by their own min and max (windowing is the caller's).

    Raises:
        DataError: a missing file, an unknown suffix, or a file that cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported image type {path.suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}"
        )
    try:
        with Image.open(path) as image:
            image.load()
            array = _pil_to_array(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from None
    return array


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (temporary name, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _pil_to_array(image) -> np.ndarray:
    if image.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "1"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    return _rescale_to_uint8(array.astype(np.float64))


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) / (high - low) * 255).astype(np.uint8)
