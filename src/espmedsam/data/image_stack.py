"""The type prediction runs on: ``ImageStack``, the frames of one 2D or multi-page image, NIfTI volume or
DICOM file/series, and ``DicomSeries``, one series of a folder holding several.

Its own module below the readers and the dispatcher (``stack.py``), which all use it: the format modules
(``dicom.py``, ``nifti.py``) import it from here, and ``stack.py`` imports them, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from espmedsam.errors import InputError

KINDS = ("image", "nifti", "dicom")
DICOM_FORMATS = ("nifti", "seg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder that holds several: each is its own input to ``espmedsam predict``.

    ``uid``: its SeriesInstanceUID ("" for files without one). ``label``: ``series<SeriesNumber>``, else
    ``uid<the UID's last 8 digits>``, unique in the folder: outputs are named ``<folder>_<label>``.
    """

    folder: Path
    uid: str
    label: str

    def __str__(self) -> str:
        return f"{self.folder} ({self.label})"


@dataclass(frozen=True)
class ImageStack:
    """Display-ready frames of one input and what is needed to write masks back into its format.

    ``frames``: (N, H, W) or (N, H, W, 3) uint8 (N=1 for a 2D image, the pages of a multi-page image).
    ``spacing``: (row, column) pixel spacing in mm when known. ``axis``: for NIfTI, the voxel axis sliced
    along. ``reference``: the nibabel image (NIfTI) or the list of pydicom datasets in frame order (DICOM);
    None for images. ``page``: the page read alone from a multi-page image. ``series``: the series read
    from a folder holding several.
    """

    frames: np.ndarray
    source: Path
    kind: str
    spacing: tuple[float, float] | None = None
    axis: int | None = None
    reference: object | None = None
    page: int | None = None
    series: DicomSeries | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"{self.source}: unknown stack kind {self.kind!r}; expected one of {KINDS}")
        shape = self.frames.shape
        if self.frames.dtype != np.uint8 or not (
            self.frames.ndim == 3 or (self.frames.ndim == 4 and shape[-1] == 3)
        ):
            raise InputError(
                f"{self.source}: frames must be (N, H, W) or (N, H, W, 3) uint8, "
                f"got {shape} {self.frames.dtype}"
            )

    @property
    def is_volume(self) -> bool:
        """More than one frame, or a DICOM series folder (a volume even when it holds one slice)."""
        return self.frames.shape[0] > 1 or (self.kind == "dicom" and self.source.is_dir())

    @property
    def name(self) -> str:
        """The output name: the file name without its format suffix (``.nii.gz``, ``.dcm``...), or the
        series folder's name; ``<folder>_<series label>`` for one series of several, ``<name>_page<N>``
        for one page."""
        if self.series is not None:
            return f"{self.source.name}_{self.series.label}"
        if self.source.is_dir():
            return self.source.name
        stem = output_stem(self.source.name, self.kind)
        return stem if self.page is None else f"{stem}_page{self.page}"


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or one with ``DICM`` at byte 128 (the DICOM file preamble)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as file:
            head = file.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def output_stem(name: str, kind: str) -> str:
    """A file name without its format's suffix (``.nii.gz``, ``.dcm``, ``.png``...): outputs' stem."""
    suffixes = {"nifti": (".nii.gz", ".nii"), "dicom": DICOM_SUFFIXES}.get(kind)
    if suffixes is None:
        return Path(name).stem
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name  # DICOM files are often named by UID ("1.2.840..."): no suffix to drop
