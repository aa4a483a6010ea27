"""Image readers: one function per family of formats, each returning an (H, W[, C]) array.

``read_image`` gives uint8 pixels for the model; ``read_mask`` gives a boolean foreground map;
``read_pages`` gives every page of a multi-page TIFF, an animated GIF or an APNG as (N, H, W[, C]).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from espmedsam.errors import DataError, InputError
from espmedsam.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (*IMAGE_SUFFIXES, ".gif")
PAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".gif")  # what ``read_pages`` reads: the images, and GIF animations
# The most pixels (width x height) an image may have, checked on its header before a pixel is decoded. The
# largest 2D images of the six modalities (dermoscopy up to ~6700 x 4500, fundus and chest X-ray ~4000²)
# have under 3e7 pixels; 1e8 (10000 x 10000: 300 MB as RGB) leaves room for stitched microscopy fields
# and refuses a decompression bomb, a small file whose header claims gigapixels. It is below Pillow's own
# refusal (at twice Image.MAX_IMAGE_PIXELS, 179 M), so Pillow's process-wide setting is left alone.
MAX_IMAGE_PIXELS = 10_000 * 10_000
# The most pixels all the pages of a multi-page image may have together (pages x width x height), checked on
# the header before a page is decoded: the cap of a NIfTI volume (``nifti.MAX_VOLUME_VOXELS``), 2048 pages
# of 512².
MAX_STACK_PIXELS = 512 * 512 * 2048


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


def read_pages(path: str | Path, *, page: int | None = None) -> np.ndarray:
    """Read every page of an image, in file order: (N, H, W) gray or (N, H, W, C) colour uint8.

    A multi-page TIFF, an animated GIF or an APNG gives its N pages (an animation's frames as a viewer
    shows them); any other image, and an MPO (a camera JPEG and its previews), gives N = 1, as
    ``read_image`` reads it. ``page`` (0-based) reads that page alone: (1, H, W[, C]). Pages that are not
    8-bit are rescaled to 0..255 by the min and max of all pages together; when pages differ in colour,
    every page is made RGB (gray repeated, alpha dropped).

    Raises:
        DataError: as ``read_image``, and more than ``MAX_STACK_PIXELS`` pixels in all pages, pages of
            different sizes, or a ``page`` the file does not have.
        InputError: a negative ``page``.
    """
    if page is not None and page < 0:
        raise InputError(f"page must be 0 or more (0 is the first page), got {page}")
    path = Path(path)
    check = _check_stack_header if page is None else _check_page_header
    pages = _read(path, PAGE_SUFFIXES, lambda image: _pil_pages(path, image, page), check=check, stacked=True)
    return pages if pages.dtype == np.uint8 else _rescale_to_uint8(pages.astype(np.float64))


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


def write_tiff_pages(path: str | Path, pages: np.ndarray) -> Path:
    """Write (N, H, W) uint8 pages as one multi-page TIFF, in order (deflate-compressed where Pillow has
    libtiff), atomically."""
    from PIL import Image, features

    images = [Image.fromarray(np.ascontiguousarray(page)) for page in pages]
    options = {"compression": "tiff_adobe_deflate"} if features.check("libtiff") else {}
    return atomic_write(
        path,
        lambda file: images[0].save(file, format="TIFF", save_all=True, append_images=images[1:], **options),
        mode="w+b",  # libtiff reads back what it wrote
    )


def _read(
    path: Path, suffixes: tuple[str, ...], to_array, *, check=None, stacked: bool = False
) -> np.ndarray:
    """``to_array(image)`` of the opened file, after ``check(path, image)`` on its header (by default
    ``_check_header``: one frame); ``stacked``: ``to_array`` loads the pages and gives (N, H, W[, C])."""
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
                (check or _check_header)(path, image)
                if not stacked:
                    image.load()
                array = to_array(image)
    except DataError:
        raise
    except UnidentifiedImageError:
        problem = "a format Pillow does not know, or a damaged header"
        raise DataError(f"{path}: cannot read image ({problem})") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise DataError(f"{path}: cannot read image ({_reason(error)})") from None
    if array.ndim - stacked not in (2, 3) or array.size == 0:
        raise DataError(f"{path}: expected a 2D image, got an array of shape {array.shape[stacked:]}")
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


def _check_header(path: Path, image, *, single: bool = True) -> None:
    """Refuse, before decoding, an image over ``MAX_IMAGE_PIXELS``, or of several frames when ``single``."""
    width, height = image.size
    _check_pixels(path, width, height)
    frames = _page_count(image)
    # a stack or a time series would be cut to its first frame without a word: refuse it instead
    if frames > 1 and single:
        raise DataError(
            f"{path}: holds {frames} frames (a multi-page TIFF or an animation); only single-frame images "
            "are read: save each frame as its own file"
        )


def _check_page_header(path: Path, image) -> None:
    """Refuse, before decoding, a first page over ``MAX_IMAGE_PIXELS`` (one page is read: any count)."""
    _check_header(path, image, single=False)


def _check_stack_header(path: Path, image) -> None:
    """Refuse, before decoding, a first page over ``MAX_IMAGE_PIXELS`` or pages over ``MAX_STACK_PIXELS``."""
    _check_header(path, image, single=False)
    (width, height), frames = image.size, _page_count(image)
    if frames * width * height > MAX_STACK_PIXELS:
        raise DataError(
            f"{path}: too large: {frames} pages of {width}x{height} = {frames * width * height:,} pixels, "
            f"over the limit of {MAX_STACK_PIXELS:,}; segment one page at a time (--page N)"
        )


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path}: image too large: its header claims {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {MAX_IMAGE_PIXELS:,}"
        )


def _page_count(image) -> int:
    """Pages of an opened image; an MPO (a camera JPEG whose further frames are previews or other views of
    the one picture) has one."""
    return 1 if image.format == "MPO" else int(getattr(image, "n_frames", 1))


def _pil_pages(path: Path, image, page: int | None) -> np.ndarray:
    """(N, H, W[, C]) of the pages of an opened image (of ``page`` alone when given), decoded one by one."""
    count = _page_count(image)
    if page is not None and page >= count:
        last = "its only page is 0" if count == 1 else f"pages 0 to {count - 1}"
        raise DataError(f"{path}: no page {page} ({count} page{'s' * (count > 1)}: {last})")
    size, arrays = image.size, []
    for index in range(count) if page is None else (page,):
        image.seek(index)
        if page is not None:
            _check_pixels(path, *image.size)  # a later page may be larger than the first
        elif image.size != size:
            raise DataError(
                f"{path}: pages of different sizes (page 0 is {size[0]}x{size[1]}, page {index} is "
                f"{image.size[0]}x{image.size[1]}); segment one page at a time (--page N)"
            )
        image.load()
        arrays.append(_pil_to_array(image))
    return np.stack(_same_channels(arrays))


def _same_channels(pages: list[np.ndarray]) -> list[np.ndarray]:
    """The pages as they are when all have the same channels (np.stack finds a common dtype), else each
    as (H, W, 3) RGB."""
    if len({page.shape[2:] for page in pages}) <= 1:
        return pages
    return [np.repeat(page[..., None], 3, axis=-1) if page.ndim == 2 else page[..., :3] for page in pages]


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
