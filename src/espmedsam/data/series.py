"""A folder of DICOM files from several series (SeriesInstanceUID) as one input per series.

``list_series`` reads headers only; each series is then read on its own by ``read_stack``: a series of several
files as a volume (``dicom.read_dicom_series``), a single file as the file it is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from espmedsam.data.dicom import MEDIA_DIRECTORY_UID, dicom_files
from espmedsam.data.image_stack import DicomSeries


def list_series(folder: str | Path) -> list[Path | DicomSeries]:
    """The inputs of a folder of DICOM files: the folder itself when it holds one series, else one input per
    series (SeriesInstanceUID), ordered by SeriesNumber: a ``DicomSeries`` for a series of several files,
    the file itself for a series of one (a 2D image, or a multi-frame volume).

    Only headers are read. Files that hold no image (DICOMDIR, reports) count for no series; a header that
    cannot be read gives the folder, whose reading then says what is wrong with that file.
    """
    folder = Path(folder)
    groups: dict[str, list[Path]] = {}
    numbers: dict[str, int | None] = {}
    for path in dicom_files(folder):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # pydicom raises InvalidDicomError, OSError, struct.error, ValueError...
            return [folder]
        if "Rows" not in header or header.get("SOPClassUID") == MEDIA_DIRECTORY_UID:
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        groups.setdefault(uid, []).append(path)
        numbers.setdefault(uid, _series_number(header))
    if len(groups) <= 1:
        return [folder]
    order = sorted(groups, key=lambda uid: (numbers[uid] is None, numbers[uid] or 0, uid))
    labels = _series_labels(order, numbers)
    return [
        groups[uid][0] if len(groups[uid]) == 1 else DicomSeries(folder, uid, labels[uid]) for uid in order
    ]


def _series_number(header: Dataset) -> int | None:
    try:
        return int(header.SeriesNumber)
    except (AttributeError, TypeError, ValueError):
        return None


def _series_labels(uids: list[str], numbers: dict[str, int | None]) -> dict[str, str]:
    """``series<SeriesNumber>`` where that number is the series' own, else ``uid<last 8 digits>``, else
    ``series-<position>``: unique labels for output names."""
    counts = Counter(numbers[uid] for uid in uids)
    labels: dict[str, str] = {}
    for position, uid in enumerate(uids, start=1):
        label = f"series{numbers[uid]}" if numbers[uid] is not None and counts[numbers[uid]] == 1 else ""
        digits = uid.replace(".", "")[-8:]
        if not label and digits and sum(u.replace(".", "")[-8:] == digits for u in uids) == 1:
            label = f"uid{digits}"
        labels[uid] = label or f"series-{position}"
    return labels
