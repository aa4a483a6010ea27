"""Reading and writing what prediction runs on (``ImageStack``, ``data/image_stack.py``).

``read_stack`` picks the reader by content; ``write_masks`` writes predicted masks back in the input's format
(PNG for images, a multi-page TIFF for multi-page images, NIfTI for NIfTI, NIfTI or DICOM-SEG for DICOM).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from espmedsam.data.image_stack import (  # noqa: F401  (re-exported: the stack's types live there)
    DICOM_FORMATS,
    DICOM_SUFFIXES,
    KINDS,
    NIFTI_SUFFIXES,
    DicomSeries,
    ImageStack,
    is_dicom_file,
    output_stem,
)
from espmedsam.data.io import PAGE_SUFFIXES, check_input_file, read_pages, write_png, write_tiff_pages
from espmedsam.errors import DataError, InputError, MissingDependencyError


def read_stack(path: str | Path | DicomSeries, *, axis: int = 2, page: int | None = None) -> ImageStack:
    """Read an image (one page, or every page of a multi-page TIFF, GIF or APNG), a NIfTI file, a DICOM
    file, a folder holding one DICOM series, or one ``DicomSeries`` of a folder holding several.

    The format is told by content where it can be: a file with the DICOM preamble (``DICM`` at byte 128)
    is DICOM whatever its suffix, as is any ``.dcm``; ``.nii``/``.nii.gz`` (or the NIfTI magic) is NIfTI;
    PNG/JPEG/TIFF/BMP/GIF go through ``read_pages`` (RGBA loses its alpha). ``axis`` (0, 1 or 2) is the
    voxel axis a NIfTI volume is sliced along; ``page`` (0-based) reads that page of an image alone.

    Raises:
        DataError: a missing or unreadable file, an unknown format, an inconsistent series or pages, or a
            page the image does not have.
        InputError: ``axis`` not 0, 1 or 2; ``page`` negative, or given for a NIfTI or DICOM input.
        MissingDependencyError: pydicom or nibabel is not installed.
    """
    if axis not in (0, 1, 2):
        raise InputError(f"NIfTI slicing axis must be 0, 1 or 2, got {axis}")
    if isinstance(path, DicomSeries):
        _no_page(path, "a DICOM series", page)
        return _dicom().read_dicom_series(path.folder, series=path)
    path = Path(path)
    if path.is_dir():
        _no_page(path, "a DICOM series", page)
        return _dicom().read_dicom_series(path)
    check_input_file(path)  # missing, a broken link or empty: said once for every format
    if is_dicom_file(path):
        _no_page(path, "DICOM", page)
        return _dicom().read_dicom_file(path)
    if _is_nifti(path):
        _no_page(path, "NIfTI", page)
        return _nifti().read_nifti(path, axis=axis)
    if path.suffix.lower() in PAGE_SUFFIXES:
        pages = read_pages(path, page=page)
        if pages.ndim == 4:
            pages = pages[..., :3]  # RGBA: the model sees colour only
        return ImageStack(np.ascontiguousarray(pages), path, "image", page=page)
    raise DataError(
        f"{path}: unsupported file type {path.suffix!r}; expected an image "
        f"({', '.join(PAGE_SUFFIXES)}), NIfTI (.nii, .nii.gz) or DICOM (.dcm or the DICM preamble)"
    )


def _no_page(path: Path | DicomSeries, kind: str, page: int | None) -> None:
    if page is not None:
        raise InputError(
            f"{path}: a page (--page) is read from multi-page images (TIFF, GIF, PNG), not {kind}"
        )


def write_masks(
    stack: ImageStack, masks: np.ndarray, out_dir: str | Path, *, dicom_format: str = "nifti"
) -> list[Path]:
    """Write (N, H, W) masks (bool, or 0/nonzero) for ``stack`` into ``out_dir`` in the input's format.

    "image" -> ``<name>_mask.png`` (0/255), or for several pages ``<name>_mask.tif`` (one 0/255 page per
    page, in order); "nifti" -> ``<name>_mask.nii.gz`` (uint8 0/1, the input's
    affine, header and spatial shape); "dicom" -> ``<name>_mask.nii.gz`` (affine from the DICOM geometry)
    or, with ``dicom_format="seg"``, a binary DICOM-SEG ``<name>_seg.dcm``. Each write is atomic.

    Raises:
        InputError: masks whose shape is not the frames' (N, H, W), or an unknown ``dicom_format``.
        MissingDependencyError: ``dicom_format="seg"`` without highdicom.
        DataError: the DICOM headers do not allow a DICOM-SEG.
    """
    if dicom_format not in DICOM_FORMATS:
        raise InputError(f"unknown DICOM mask format {dicom_format!r}; expected one of {DICOM_FORMATS}")
    masks = np.asarray(masks)
    if masks.shape != stack.frames.shape[:3]:
        raise InputError(f"{stack.source}: masks of shape {masks.shape}, expected {stack.frames.shape[:3]}")
    masks = masks != 0
    out_dir = Path(out_dir)
    if stack.kind == "image" and len(masks) > 1:
        return [write_tiff_pages(out_dir / f"{stack.name}_mask.tif", masks.astype(np.uint8) * 255)]
    if stack.kind == "image":
        return [write_png(out_dir / f"{stack.name}_mask.png", masks[0].astype(np.uint8) * 255)]
    if stack.kind == "nifti":
        nifti = _nifti()
        volume = nifti.masks_to_volume(stack, masks)
        return [nifti.write_nifti_mask(out_dir / f"{stack.name}_mask.nii.gz", volume, stack.reference)]
    dicom = _dicom()
    if dicom_format == "seg":
        return [dicom.write_dicom_seg(out_dir / f"{stack.name}_seg.dcm", stack, masks)]
    # NIfTI voxel order (column, row, frame), as dcm2niix writes a series
    volume = np.ascontiguousarray(masks.transpose(2, 1, 0)).astype(np.uint8)
    affine = dicom.nifti_affine(stack.reference, len(masks))
    return [_nifti().write_nifti_mask(out_dir / f"{stack.name}_mask.nii.gz", volume, None, affine=affine)]


def _is_nifti(path: Path) -> bool:
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return True
    try:
        with path.open("rb") as file:
            head = file.read(348)
    except OSError:
        return False
    # uncompressed single-file NIfTI-1 ("n+1" at 344) or NIfTI-2 ("n+2" at 4)
    return head[344:348] == b"n+1\0" or head[4:8] == b"n+2\0"


def _dicom():
    try:
        from espmedsam.data import dicom
    except ModuleNotFoundError as error:
        raise MissingDependencyError(f"DICOM needs {error.name}; pip install pydicom") from None
    return dicom


def _nifti():
    try:
        from espmedsam.data import nifti
    except ModuleNotFoundError as error:
        raise MissingDependencyError(f"NIfTI needs {error.name}; pip install nibabel") from None
    return nifti
