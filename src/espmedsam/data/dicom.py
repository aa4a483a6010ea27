"""DICOM files and series as display-ready uint8 frames (pydicom), and the geometry to write masks back.

Grayscale frames go through the modality LUT (RescaleSlope/Intercept or a Modality LUT), then the VOI LUT or
the first WindowCenter/WindowWidth (else the frame's own min..max), then 0..255; MONOCHROME1 is inverted so
bright means dense as in MONOCHROME2. Colour frames (RGB, YBR_*, PALETTE COLOR) come out as RGB, unwindowed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from espmedsam.data.image_stack import DicomSeries, ImageStack, is_dicom_file
from espmedsam.errors import DataError, MissingDependencyError
from espmedsam.files import atomic_write

logger = logging.getLogger(__name__)

COMPRESSED_HINT = (
    "pip install 'espmedsam[dicom-compressed]' "
    "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, python-gdcm)"
)
MEDIA_DIRECTORY_UID = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of a CD, not an image
# the attributes that turn stored values into display values, copied into a per-frame view
_PIXEL_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
# enhanced multi-frame files keep them in functional groups instead (shared, then per frame)
_GROUP_KEYWORDS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def read_dicom_file(path: str | Path) -> ImageStack:
    """One DICOM file as an ImageStack: (N, H, W) or (N, H, W, 3) uint8, N = NumberOfFrames.

    ``reference`` is ``[dataset]`` without its PixelData (decoded already; the headers are what a DICOM-SEG
    needs). ``spacing`` is PixelSpacing, else the functional groups' PixelMeasuresSequence, else
    ImagerPixelSpacing (at the detector), else None.

    Raises:
        DataError: an unreadable file, no pixel data, or a transfer syntax that no installed package decodes.
    """
    path = Path(path)
    dataset = _read_dataset(path)
    frames = _frames(dataset, path)
    return ImageStack(frames, path, "dicom", _spacing(dataset), None, [dataset])


def read_dicom_series(folder: str | Path, *, series: DicomSeries | None = None) -> ImageStack:
    """The DICOM files of a folder (not its subfolders) as one series, one frame per slice; with ``series``,
    only that series' files (``espmedsam.data.series.list_series`` lists a folder's series).

    Files without the DICOM preamble and without a ``.dcm`` suffix are skipped, as are DICOM files that hold
    no image (DICOMDIR, reports). Slices are sorted by ImagePositionPatient along the slice normal, else by
    InstanceNumber, else by file name. A folder with a single (possibly multi-frame) file reads as that file.

    Raises:
        DataError: no DICOM image in the folder (of ``series``), several series without ``series``,
            multi-frame files among several, slices of different sizes, or any slice that cannot be read.
    """
    folder = Path(folder)
    where = folder if series is None else series  # what messages name
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    slices: list[tuple[Path, Dataset]] = []
    for path in dicom_files(folder):
        if series is not None and _series_uid(path) != series.uid:
            continue
        dataset = _read_dataset(path)
        if dataset.get("SOPClassUID") == MEDIA_DIRECTORY_UID or "PixelData" not in dataset:
            logger.info("%s: DICOM file without an image, skipped", path)
            continue
        slices.append((path, dataset))
    if not slices:
        raise DataError(f"{where}: no DICOM image files in this folder")
    uids = {str(dataset.get("SeriesInstanceUID", "")) for _, dataset in slices}
    if len(uids) > 1:
        raise DataError(
            f"{folder}: {len(uids)} DICOM series (SeriesInstanceUID) in one folder; "
            "read each on its own (espmedsam.data.series.list_series lists them) or pass one folder per "
            "series"
        )
    if len(slices) > 1 and any(_frame_count(dataset) > 1 for _, dataset in slices):
        raise DataError(f"{where}: multi-frame files among {len(slices)} files; pass each file on its own")
    slices = _sorted_slices(slices)
    sizes = {(int(dataset.Rows), int(dataset.Columns)) for _, dataset in slices}
    if len(sizes) > 1:
        raise DataError(f"{where}: slices of different sizes (rows, columns) {sorted(sizes)}")
    frames = [_frames(dataset, path) for path, dataset in slices]
    if len({frame.shape for frame in frames}) > 1:
        raise DataError(f"{where}: slices mix grayscale and colour")
    datasets = [dataset for _, dataset in slices]
    spacing = _spacing(datasets[0])
    return ImageStack(np.concatenate(frames), folder, "dicom", spacing, None, datasets, series=series)


def dicom_files(folder: Path) -> list[Path]:
    """The files of ``folder`` told DICOM by their preamble or suffix, by name (hidden files left out)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path for path in files if is_dicom_file(path)]


def _series_uid(path: Path) -> str:
    """A file's SeriesInstanceUID, from its header alone ("" when it has none)."""
    try:
        header = pydicom.dcmread(
            path, stop_before_pixels=True, force=True, specific_tags=["SeriesInstanceUID"]
        )
    except Exception as error:  # as _read_dataset
        raise DataError(f"{path}: cannot read DICOM ({error})") from None
    return str(header.get("SeriesInstanceUID", ""))


def nifti_affine(datasets: Sequence[Dataset], n_frames: int) -> np.ndarray:
    """The 4x4 RAS affine of a mask laid out (column, row, frame) over these slices (or one multi-frame file).

    From ImageOrientationPatient, the frames' ImagePositionPatient and PixelSpacing when all are there
    (DICOM's LPS patient axes turned to NIfTI's RAS), else a scaling by PixelSpacing, else the identity.
    """
    first = datasets[0]
    spacing = _spacing(first)
    if len(datasets) == 1:
        planes = [_plane(first, i) for i in range(n_frames)]
    else:
        planes = [_plane(dataset) for dataset in datasets]
    orientation = planes[0][0]
    positions = [position for _, position in planes]
    thickness = _slice_thickness(first)
    if spacing is None:
        return np.eye(4)
    if orientation is None or any(position is None for position in positions):
        return np.diag([spacing[1], spacing[0], thickness, 1.0])
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    step = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else np.zeros(3)
    if np.linalg.norm(step) < 1e-6:  # one slice, or positions that do not move
        step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_direction * spacing[1]  # along a row: the column index grows
    lps[:3, 1] = column_direction * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_dicom_seg(path: Path, stack: ImageStack, masks: np.ndarray) -> Path:
    """Write (N, H, W) bool masks as a binary DICOM-SEG (one segment, "foreground", one frame per source
    frame) over the stack's source DICOM datasets, atomically.

    Raises:
        MissingDependencyError: highdicom is not installed.
        DataError: the source headers lack what a DICOM-SEG must copy (patient, study, frame of reference),
            or highdicom cannot keep the frames apart (multi-frame files without per-frame geometry).
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "DICOM-SEG output needs highdicom; pip install highdicom (or espmedsam[dicom-seg])"
        ) from None
    from espmedsam import __version__

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="foreground",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="ESP-MedSAM", family=codes.DCM.ArtificialIntelligence, version=__version__
        ),
    )
    sources = stack.reference
    if "PixelSpacing" in sources[0] and "SliceThickness" not in sources[0]:
        # highdicom copies SliceThickness (type 2, often absent): the spacing of the slices stands in for it
        thickness = float(np.linalg.norm(nifti_affine(sources, len(masks))[:3, 2]))
        sources = [copy.deepcopy(dataset) for dataset in sources]  # headers only: the pixels are gone
        for dataset in sources:
            dataset.SliceThickness = round(thickness, 6)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=masks.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="espmedsam",
            manufacturer_model_name="ESP-MedSAM",
            software_versions=__version__,
            device_serial_number="0",
            series_description="ESP-MedSAM mask",
            omit_empty_frames=False,  # one frame per source frame, so readers need no frame bookkeeping
        )
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise DataError(f"{stack.source}: cannot build a DICOM-SEG from these headers ({error})") from None
    if int(seg.NumberOfFrames) != len(masks):
        # highdicom merges frames it cannot place apart (a multi-frame file without per-frame geometry)
        raise DataError(
            f"{stack.source}: DICOM-SEG would hold {seg.NumberOfFrames} frames for {len(masks)} "
            "source frames; write the mask as NIfTI instead"
        )
    return atomic_write(path, lambda file: seg.save_as(file, enforce_file_format=True))


def _read_dataset(path: Path) -> Dataset:
    try:
        # force: old files and some exports have no preamble; what was read is checked below
        dataset = pydicom.dcmread(path, force=True)
        dataset.get("PixelData")  # parses up to the pixel data, so a broken file fails here
    except Exception as error:  # pydicom raises InvalidDicomError, OSError, struct.error, ValueError...
        raise DataError(f"{path}: cannot read DICOM ({error})") from None
    if "TransferSyntaxUID" not in dataset.file_meta:
        # no file meta (a raw dataset): the encoding pydicom found is the transfer syntax
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit in (True, None)
            else ExplicitVRLittleEndian
            if little in (True, None)
            else ExplicitVRBigEndian
        )
    return dataset


def _frames(dataset: Dataset, path: Path) -> np.ndarray:
    """Decode, window and drop the pixel data: (N, H, W) or (N, H, W, 3) uint8."""
    if "PixelData" not in dataset:
        raise DataError(f"{path}: DICOM file has no pixel data")
    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(f"{path}: unsupported DICOM transfer syntax {syntax.name} ({syntax})") from None
    if not decoder.is_available:
        raise DataError(f"{path}: no installed package decodes {syntax.name} ({syntax}); {COMPRESSED_HINT}")
    try:
        array = pixel_array(dataset)  # YBR_* comes out as RGB (pydicom 3 converts by default)
    except Exception as error:  # decoders raise ValueError, RuntimeError, NotImplementedError...
        raise DataError(f"{path}: cannot decode DICOM pixel data ({error})") from None
    n = _frame_count(dataset)
    if n == 1:
        array = array[None]
    interpretation = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if interpretation == "PALETTE COLOR":
            frames = _color_to_uint8(apply_color_lut(array, dataset), 16)
        elif int(dataset.get("SamplesPerPixel", 1)) == 3:
            frames = _color_to_uint8(array, int(dataset.get("BitsStored", 8)))
        else:
            frames = np.stack([_gray_to_uint8(array[i], _frame_view(dataset, i)) for i in range(n)])
    except (ValueError, TypeError, AttributeError, IndexError, NotImplementedError) as error:
        raise DataError(f"{path}: cannot map DICOM pixel values to display ({error})") from None
    if frames.ndim not in (3, 4) or frames.shape[0] != n:
        raise DataError(f"{path}: unexpected DICOM pixel array of shape {array.shape}")
    # the frames are decoded; keeping the raw bytes too would double a series' memory
    del dataset.PixelData
    return frames


def _frame_count(dataset: Dataset) -> int:
    return int(dataset.get("NumberOfFrames") or 1)


def _color_to_uint8(array: np.ndarray, bits: int) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    return np.round(array.astype(np.float64) / (2**bits - 1) * 255).clip(0, 255).astype(np.uint8)


def _gray_to_uint8(frame: np.ndarray, view: Dataset) -> np.ndarray:
    values = apply_modality_lut(frame, view)
    display = None
    if _has_voi_lut(view):
        # a VOI LUT is indexed by integers; its output range is the range of its entries
        values = np.rint(values).astype(np.int64)
        descriptor = view.VOILUTSequence[0].LUTDescriptor
        domain = np.arange(int(descriptor[1]), int(descriptor[1]) + (int(descriptor[0]) or 2**16))
        entries = apply_voi_lut(domain, view)
        display = (apply_voi_lut(values, view), float(entries.min()), float(entries.max()))
    elif "WindowCenter" in view and "WindowWidth" in view:
        try:
            # the window's output range: what it maps -inf and +inf to
            ends = apply_voi_lut(np.array([-np.inf, np.inf]), view)
            display = (apply_voi_lut(values, view), float(ends.min()), float(ends.max()))
        except ValueError as error:  # a width < 1, an unknown VOILUTFunction: show the data range
            logger.warning("ignoring the DICOM window (%s)", error)
    if display is None:
        display = (values, float(values.min()), float(values.max()))
    shown, low, high = display
    if high <= low:
        out = np.zeros(frame.shape, np.uint8)
    else:
        out = np.round(np.clip((shown - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    if str(view.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: the lowest value is white
    return out


def _has_voi_lut(view: Dataset) -> bool:
    sequence = view.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _frame_view(dataset: Dataset, index: int) -> Dataset:
    """A dataset holding frame ``index``'s pixel-value attributes, for pydicom's LUT functions."""
    view = Dataset()
    view.file_meta = dataset.file_meta  # the endianness of OW LUT data
    for keyword in _PIXEL_KEYWORDS:
        if keyword in dataset:
            view.add(dataset[keyword])
    for group in _functional_groups(dataset, index):
        for sequence, keywords in _GROUP_KEYWORDS.items():
            if group.get(sequence):
                item = group[sequence].value[0]
                for keyword in keywords:
                    if keyword in item:
                        view.add(item[keyword])
    return view


def _functional_groups(dataset: Dataset, index: int) -> list[Dataset]:
    """Shared then per-frame functional group items of an enhanced multi-frame file (empty for others)."""
    groups = []
    if dataset.get("SharedFunctionalGroupsSequence"):
        groups.append(dataset.SharedFunctionalGroupsSequence[0])
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    return groups


def _from_groups(dataset: Dataset, index: int, sequence: str, keyword: str):
    """``keyword`` at the top level, else in a functional group's ``sequence`` (the per-frame one wins)."""
    if keyword in dataset:
        return dataset.get(keyword)
    value = None
    for group in _functional_groups(dataset, index):
        if group.get(sequence) and keyword in group[sequence].value[0]:
            value = group[sequence].value[0].get(keyword)
    return value


def _spacing(dataset: Dataset) -> tuple[float, float] | None:
    value = _from_groups(dataset, 0, "PixelMeasuresSequence", "PixelSpacing")
    if value is None:
        value = dataset.get("ImagerPixelSpacing")
    try:
        spacing = (float(value[0]), float(value[1]))
    except (TypeError, ValueError, IndexError):
        return None
    return spacing if min(spacing) > 0 else None


def _slice_thickness(dataset: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _from_groups(dataset, 0, "PixelMeasuresSequence", keyword)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            pass
    return 1.0


def _plane(dataset: Dataset, index: int = 0) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(ImageOrientationPatient (6,), ImagePositionPatient (3,)) of one frame; None where absent."""
    orientation = _from_groups(dataset, index, "PlaneOrientationSequence", "ImageOrientationPatient")
    position = _from_groups(dataset, index, "PlanePositionSequence", "ImagePositionPatient")
    return _vector(orientation, 6), _vector(position, 3)


def _vector(value, size: int) -> np.ndarray | None:
    try:
        vector = np.array([float(v) for v in value])
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (size,) and np.isfinite(vector).all() else None


def _sorted_slices(slices: list[tuple[Path, Dataset]]) -> list[tuple[Path, Dataset]]:
    """By position along the slice normal, else InstanceNumber, else file name (the order given)."""
    planes = [_plane(dataset) for _, dataset in slices]
    orientation = planes[0][0]
    if orientation is not None and all(position is not None for _, position in planes):
        normal = np.cross(orientation[:3], orientation[3:])
        keys = [float(position @ normal) for _, position in planes]
    else:
        try:
            keys = [int(dataset.InstanceNumber) for _, dataset in slices]
        except (AttributeError, TypeError, ValueError):
            return slices
    order = sorted(range(len(slices)), key=lambda i: keys[i])  # stable: ties keep file-name order
    return [slices[i] for i in order]
