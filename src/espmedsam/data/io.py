"""Image readers: one function per family of formats, each returning an (H, W[, C]) array.

``read_image`` gives uint8 pixels for the model; ``read_mask`` gives a boolean foreground map.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from espmedsam.errors import DataError
from espmedsam.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (*IMAGE_SUFFIXES, ".gif")
# The most pixels (width x height) an image may have, checked on its header before a pixel is decoded. The
# largest 2D images of the six modalities (dermoscopy up to ~6700 x 4500, fundus and chest X-ray ~4000²)
# have under 3e7 pixels; 1e8 (10000 x 10000: 300 MB as RGB) leaves room for stitched microscopy fields
# and refuses a decompression bomb, a small file whose header claims gigapixels. It is below Pillow's own
# refusal (at twice Image.MAX_IMAGE_PIXELS, 179 M), so Pillow's process-wide setting is left alone.
MAX_IMAGE_PIXELS = 10_000 * 10_000


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image as uint8: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA.

    8-bit images are returned as stored; palette images are expanded to RGB (RGBA with transparency);
    16-bit, 32-bit and float images are rescaled to 0..255 by their own min and max (windowing is the
    caller's).

    Raises:
        DataError: a missing, empty or unreadable file, an unknown suffix, more than ``MAX_IMAGE_PIXELS``
            pixels, several frames (a multi-page TIFF, an animation), or NaN or infinite pixel values.
    """
    array = _read(Path(path), IMAGE_SUFFIXES, _pil_to_array)
    return array if array.dtype == np.uint8 else _rescale_to_uint8(array.astype(np.float64))


def read_mask(path: str | Path, *, threshold: float = 0) -> np.ndarray:
    """Read a 2D mask as an (H, W) bool array: foreground where the stored value is > ``threshold``.

    Values are compared as stored (16-bit and float masks are not rescaled). For RGB(A) masks a pixel is
    foreground when any colour channel is > ``threshold`` (alpha is ignored); palette masks are compared
    through their palette colours. GIF is accepted besides the image formats (DRIVE ships GIF masks).

    Raises:
        DataError: as ``read_image``.
    """
    array = read_mask_values(path)
    if array.ndim == 3:
        return (array[..., :3] > threshold).any(axis=-1)
    return array > threshold


def read_mask_values(path: str | Path) -> np.ndarray:
    """Read a mask's values as stored: (H, W) or (H, W, C) of the file's dtype (palette -> RGB colours).

    Raises:
        DataError: as ``read_image``.
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
    from PIL import UnidentifiedImageError

    if path.suffix.lower() not in suffixes:
        raise DataError(
            f"{path}: unsupported image type {path.suffix!r}; expected one of {', '.join(suffixes)}"
        )
    check_input_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns of what our checks refuse anyway (a decompression bomb) or of what does not
            # change the pixels (corrupt EXIF); its warnings would break the one line of an error
            warnings.filterwarnings("ignore", module="PIL")
            with _open_image(path) as image:
                _check_header(path, image)
                image.load()
                array = to_array(image)
    except DataError:
        raise
    except UnidentifiedImageError:
        problem = "a format Pillow does not know, or a damaged header"
        raise DataError(f"{path}: cannot read image ({problem})") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise DataError(f"{path}: cannot read image ({_reason(error)})") from None
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(f"{path}: expected a 2D image, got an array of shape {array.shape}")
    if array.dtype.kind == "f":
        _check_finite(path, array)
    return array


def check_input_file(path: Path) -> None:
    """Raise a DataError unless ``path`` is a non-empty file: saying if it is missing, a broken symbolic
    link, a folder or empty."""
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        return
    if path.is_symlink() and not path.exists():
        raise DataError(f"{path}: broken symbolic link (its target {path.readlink()} does not exist)")
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a file")
    raise DataError(f"{path}: no such file")


def _open_image(path: Path):
    """``Image.open`` (the header only), with Pillow's decompression-bomb refusal in one line."""
    from PIL import Image

    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        claims = f"its header claims {int(found.group(1)):,} pixels" if found else _reason(error)
        limit = f"over the limit of {MAX_IMAGE_PIXELS:,}"
        raise DataError(f"{path}: image too large: {claims}, {limit}") from None


def _check_header(path: Path, image) -> None:
    """Refuse, before decoding, an image over ``MAX_IMAGE_PIXELS`` or of several frames."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path}: image too large: its header claims {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {MAX_IMAGE_PIXELS:,}"
        )
    frames = getattr(image, "n_frames", 1)
    # a stack or a time series would be cut to its first frame without a word: refuse it instead (not an
    # MPO, a camera JPEG whose further frames are previews or other views of the one picture)
    if frames > 1 and image.format != "MPO":
        raise DataError(
            f"{path}: holds {frames} frames (a multi-page TIFF or an animation); only single-frame images "
            "are read: save each frame as its own file"
        )


def _check_finite(path: Path, array: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad == array.size:
        raise DataError(f"{path}: no finite pixels (every value is NaN or infinite)")
    if bad:
        raise DataError(f"{path}: {bad} of {array.size} pixels are NaN or infinite")


def _reason(error: Exception) -> str:
    """An exception as one line: its message (an OSError's strerror), else its type."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(text.split())


def _pil_to_array(image) -> np.ndarray:
    if image.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "1"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return np.asarray(image)


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
