"""NIfTI volumes as 2D frames, and masks written back voxel for voxel.

Slice convention: a 3D volume of voxel shape (X, Y, Z) is cut along ``axis``; each slice keeps the other two
voxel axes (p, q) in order and is transposed, so frame rows run along q and columns along p. Along axis 2 a
frame is ``volume[:, :, k].T`` (rows = Y, columns = X): the (z, y, x) array layout of SimpleITK, which
MedSAM/LiteMedSAM preprocessing (and so the bundled weights) used. No flips: whatever the affine says about
left/right, the mask maps back onto exactly the voxels it was predicted on.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from espmedsam.data.image_stack import ImageStack
from espmedsam.errors import DataError, InputError
from espmedsam.files import atomic_write

# CT (Hounsfield units) and MR (arbitrary units) have no 8-bit range: the volume's own 0.5 and 99.5
# percentiles, shared by all its slices, clip outliers (metal, fat-saturation spikes) and keep tissue contrast
WINDOW_PERCENTILES = (0.5, 99.5)
# The most voxels a volume may have, checked on its header before its data are read: a CT of 2048 slices of
# 512² (2 GB as float32). A .nii.gz of zeros compresses a thousandfold, so a small file could claim far more.
MAX_VOLUME_VOXELS = 512 * 512 * 2048


def read_nifti(path: str | Path, *, axis: int = 2) -> ImageStack:
    """Read a ``.nii``/``.nii.gz`` as an ImageStack: (N, H, W) uint8 slices along ``axis``, or (1, H, W).

    2D images and 3D images with a single slice give one frame (cut along their single-slice axis whatever
    ``axis`` says); RGB24 images give (N, H, W, 3) as stored, others are windowed by ``WINDOW_PERCENTILES``.
    A 4D image holding one volume is read as 3D. ``spacing`` is the header zooms of the (row, column) axes.

    Raises:
        InputError: ``axis`` not 0, 1 or 2.
        DataError: an unreadable file, more than ``MAX_VOLUME_VOXELS`` voxels, more than one volume (4D),
            more than 3 spatial axes, or NaN/inf.
    """
    path = Path(path)
    if axis not in (0, 1, 2):
        raise InputError(f"NIfTI slicing axis must be 0, 1 or 2, got {axis}")
    try:
        image = nib.load(path)
        claimed = tuple(int(n) for n in image.header.get_data_shape())
        if np.prod(claimed, dtype=np.float64) > MAX_VOLUME_VOXELS:
            size = "x".join(map(str, claimed))
            raise DataError(
                f"{path}: volume too large: its header claims {size} voxels, "
                f"over the limit of {MAX_VOLUME_VOXELS:,}"
            )
        raw = np.asanyarray(image.dataobj)
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types (ImageFileError, OSError, EOFError, ValueError)
        raise DataError(f"{path}: cannot read NIfTI ({error or type(error).__name__})") from None
    shape = raw.shape
    # trailing singleton axes (a 4D file of one volume, a 2D image stored as X x Y x 1 x 1) are no axes at all
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise DataError(f"{path}: 4D NIfTI with {shape[3]} volumes; split it into 3D volumes first")
    if len(shape) not in (2, 3) or 0 in shape:
        raise DataError(f"{path}: expected a 2D or 3D NIfTI image, got shape {raw.shape}")
    rgb = raw.dtype.names is not None
    if rgb:
        if not {"R", "G", "B"} <= set(raw.dtype.names):
            raise DataError(f"{path}: unsupported NIfTI data type {raw.dtype}")
        volume = np.stack([raw["R"], raw["G"], raw["B"]], axis=-1).astype(np.uint8).reshape(*shape, 3)
    else:
        try:
            volume = image.get_fdata(dtype=np.float32).reshape(shape)
        except Exception as error:
            raise DataError(f"{path}: cannot read NIfTI data ({error})") from None
        if not np.isfinite(volume).all():
            raise DataError(f"{path}: NIfTI data holds NaN or infinite values")
    if len(shape) == 2:
        volume, axis = volume[:, :, None], 2
    elif shape[axis] != 1 and 1 in shape:
        axis = len(shape) - 1 - shape[::-1].index(1)  # a single slice: cut along its singleton axis
    frames = _slices(volume, axis)
    if not rgb:
        frames = _window(frames)
    # zooms are float32: 0.7 would read 0.699999988
    zooms = tuple(round(float(z), 6) for z in image.header.get_zooms()[:3]) + (1.0,) * 3
    rows, columns = [a for a in range(3) if a != axis][::-1]
    return ImageStack(np.ascontiguousarray(frames), path, "nifti", (zooms[rows], zooms[columns]), axis, image)


def masks_to_volume(stack: ImageStack, masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> uint8 0/1 volume of the NIfTI's spatial shape, undoing ``read_nifti``'s slicing."""
    volume = np.moveaxis(masks.transpose(0, 2, 1), 0, stack.axis).astype(np.uint8)
    spatial = stack.reference.shape
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial = spatial[:-1]
    return volume.reshape(spatial)


def write_nifti_mask(path: Path, volume: np.ndarray, reference, *, affine: np.ndarray | None = None) -> Path:
    """Write a uint8 mask volume as ``.nii.gz``, atomically: with the affine and header of ``reference`` (a
    nibabel image) when given, else with ``affine`` (identity when None)."""
    if reference is not None:
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)  # a float input's scaling must not rescale the 0/1 labels
        header["cal_min"], header["cal_max"] = 0, 1
        image = type(reference)(volume, reference.affine, header)
    else:
        image = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine)
        image.header.set_data_dtype(np.uint8)
        image.header.set_xyzt_units("mm")
    image.header.set_intent("label")
    # to_bytes: the whole file in memory, so a failed write leaves nothing behind
    return atomic_write(path, lambda file: file.write(gzip.compress(image.to_bytes(), compresslevel=6)))


def _slices(volume: np.ndarray, axis: int) -> np.ndarray:
    # (X, Y, Z[, 3]) -> (N, q, p[, 3]): slices along axis first, then swap the two in-plane axes
    stacked = np.moveaxis(volume, axis, 0)
    return stacked.swapaxes(1, 2)


def _window(frames: np.ndarray) -> np.ndarray:
    low, high = np.percentile(frames, WINDOW_PERCENTILES)
    if high <= low:  # mostly constant (a label map, a padded volume): fall back to the full range
        low, high = float(frames.min()), float(frames.max())
    if high <= low:
        return np.zeros(frames.shape, np.uint8)
    scaled = (frames - low) / (high - low)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
