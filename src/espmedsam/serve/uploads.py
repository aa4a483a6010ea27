"""Uploaded bytes -> a file the readers can open: the format sniffed from the content, limits checked.

Nothing from the request names a file: an upload is written as ``upload<suffix>`` into a fresh folder of
the server's own temporary workspace, the suffix told by the bytes (a PNG named ``.jpg`` is a PNG; a text
file named ``.png`` is refused), and the folder is removed when the request is done.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from espmedsam.errors import DataError, EspMedSAMError

# (magic bytes, offset, format, suffix the readers know it by); DICOM first: its 128-byte preamble may hold
# another format's header (TIFF, in files that are both)
_SIGNATURES = (
    (b"DICM", 128, "dicom", ".dcm"),
    (b"\x89PNG\r\n\x1a\n", 0, "png", ".png"),
    (b"\xff\xd8\xff", 0, "jpeg", ".jpg"),
    (b"II*\x00", 0, "tiff", ".tif"),
    (b"MM\x00*", 0, "tiff", ".tif"),
    (b"II+\x00", 0, "tiff", ".tif"),  # BigTIFF
    (b"n+1\x00", 344, "nifti", ".nii"),
    (b"n+2\x00", 4, "nifti", ".nii"),
    (b"BM", 0, "bmp", ".bmp"),
    (b"GIF87a", 0, "gif", ".gif"),
    (b"GIF89a", 0, "gif", ".gif"),
)
FORMATS = ("png", "jpeg", "tiff", "bmp", "gif", "dicom", "nifti")
_NIFTI_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348


class UploadTooLarge(EspMedSAMError):
    """An upload over the byte cap, or an image over the dimension caps (HTTP 413)."""


class UnsupportedFormat(EspMedSAMError):
    """Bytes that are none of the formats the server reads (HTTP 415)."""


@dataclass(frozen=True)
class UploadLimits:
    """What one request may bring: bytes of the upload, pixels of one frame, frames of a volume (or pages
    of a multi-page image)."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 6000 * 6000  # large dermoscopy photographs reach ~6700 x 4500
    max_frames: int = 512

    def check_frames(self, count: int, height: int, width: int) -> None:
        """Raises UploadTooLarge for frames or a volume over the caps."""
        if height * width > self.max_pixels:
            raise UploadTooLarge(
                f"image of {width} x {height} pixels over this server's limit of {self.max_pixels:,} pixels"
            )
        if count > self.max_frames:
            raise UploadTooLarge(f"volume of {count} slices is over this server's limit of {self.max_frames}")


@dataclass(frozen=True)
class SniffedFormat:
    name: str  # one of FORMATS
    suffix: str  # what the file is written as, so that ``read_stack`` picks the right reader


def sniff_format(data: bytes) -> SniffedFormat:
    """The format of an upload, from its first bytes (gzip is looked into for a NIfTI header).

    Raises:
        UnsupportedFormat: none of ``FORMATS``.
    """
    head = data[:_NIFTI_HEADER_BYTES]
    if head[:2] == b"\x1f\x8b":
        if _is_nifti_header(_gunzip_head(data)):
            return SniffedFormat("nifti", ".nii.gz")
    else:
        for magic, offset, name, suffix in _SIGNATURES:
            if head[offset : offset + len(magic)] == magic:
                return SniffedFormat(name, suffix)
    raise UnsupportedFormat(
        "not a supported file: expected PNG, JPEG, TIFF, BMP, GIF, DICOM or NIfTI (told by the content, "
        "not by the file name)"
    )


def _gunzip_head(data: bytes) -> bytes:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, _NIFTI_HEADER_BYTES)
    except zlib.error:
        return b""


def _is_nifti_header(head: bytes) -> bool:
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


@contextmanager
def saved_upload(data: bytes, fmt: SniffedFormat, workspace: Path) -> Iterator[Path]:
    """Write ``data`` as ``upload<suffix>`` in a new folder of ``workspace``; the folder is removed after."""
    folder = Path(tempfile.mkdtemp(prefix="request-", dir=workspace))
    try:
        path = folder / f"upload{fmt.suffix}"
        path.write_bytes(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_dimensions(path: Path, fmt: SniffedFormat, limits: UploadLimits) -> None:
    """Read the header only (no pixel data) and refuse images over ``limits`` before decoding them.

    Raises:
        UploadTooLarge: over a cap.
        DataError: a header that cannot be read.
    """
    try:
        count, height, width = _header_shape(path, fmt)
    except Exception as error:  # any decoder's complaint about a broken header
        raise DataError(f"cannot read the file's header ({type(error).__name__}: {error})") from None
    limits.check_frames(count, height, width)


def _header_shape(path: Path, fmt: SniffedFormat) -> tuple[int, int, int]:
    """(frames, height, width) from the header; a NIfTI volume is cut along its third axis."""
    if fmt.name == "dicom":
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(getattr(header, "NumberOfFrames", 1) or 1), int(header.Rows), int(header.Columns)
    if fmt.name == "nifti":
        import nibabel

        shape = tuple(int(n) for n in nibabel.load(path).header.get_data_shape()[:3])
        rows, columns, slices = shape + (1,) * (3 - len(shape))
        return slices, rows, columns
    from PIL import Image

    with Image.open(path) as image:
        return int(getattr(image, "n_frames", 1)), image.height, image.width


def display_name(filename: str | None) -> str:
    """The uploaded name, cut to its last path component and to safe characters: for messages and for the
    name a browser suggests when saving a result; never used for a file on the server."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip(" .")
    return name[:120] or "upload"
