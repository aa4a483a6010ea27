from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from test_dicom import ramp, write_dicom

from espmedsam.data.series import list_series
from espmedsam.data.stack import DicomSeries, read_stack
from espmedsam.errors import DataError


def write_slices(
    folder: Path, count: int, number: int | None, *, uid: str | None = None, tag: str = ""
) -> str:
    """``count`` slices of one series; slice k's marker column is k, files written in reverse order."""
    uid = uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        pixels = np.zeros((4, 6), np.uint16)
        pixels[:, k] = 1000
        numbered = {} if number is None else {"SeriesNumber": number}
        name = f"{tag}{count - k:03d}.dcm"
        write_dicom(folder / name, pixels, SeriesInstanceUID=uid, InstanceNumber=k + 1, **numbered)
    return uid


def test_a_folder_of_one_series_is_one_input(tmp_path):
    write_slices(tmp_path / "ct", 3, 4)
    assert list_series(tmp_path / "ct") == [tmp_path / "ct"]


def test_each_series_is_its_own_input_by_series_number(tmp_path):
    folder = tmp_path / "study"
    second = write_slices(folder, 2, 7, tag="b")
    first = write_slices(folder, 3, 2, tag="a")
    write_dicom(folder / "scout.dcm", ramp(), SeriesInstanceUID=generate_uid(), SeriesNumber=9)
    (folder / "README.txt").write_text("not DICOM")
    assert list_series(folder) == [
        DicomSeries(folder, first, "series2"),
        DicomSeries(folder, second, "series7"),
        folder / "scout.dcm",  # a series of one file: that file, a 2D image
    ]


def test_a_series_is_read_alone_sorted_and_named_after_its_label(tmp_path):
    folder = tmp_path / "study"
    write_slices(folder, 2, 7, tag="b")
    uid = write_slices(folder, 3, 2, tag="a")
    stack = read_stack(DicomSeries(folder, uid, "series2"))
    assert stack.frames.shape == (3, 4, 6) and stack.is_volume and stack.name == "study_series2"
    assert [int(np.argmax(frame[0])) for frame in stack.frames] == [0, 1, 2]
    assert {str(dataset.SeriesInstanceUID) for dataset in stack.reference} == {uid}
    single = read_stack(folder / "b001.dcm")
    assert not single.is_volume and single.name == "b001"


def test_without_distinct_series_numbers_the_uid_names_the_series(tmp_path):
    folder = tmp_path / "mixed"
    a = write_slices(folder, 2, 1, uid="1.2.3.11112222", tag="a")
    b = write_slices(folder, 2, 1, uid="1.2.3.33334444", tag="b")
    c = write_slices(folder, 2, None, uid="1.2.3.99998888", tag="c")
    labels = {item.uid: item.label for item in list_series(folder)}
    assert labels == {a: "uid11112222", b: "uid33334444", c: "uid99998888"}


def test_a_truncated_file_is_its_own_input_whose_reading_fails(tmp_path):
    folder = tmp_path / "study"
    write_slices(folder, 2, 1, tag="a")
    write_slices(folder, 2, 2, tag="b")
    whole = write_dicom(folder / "c.dcm", ramp(), SeriesInstanceUID=generate_uid(), SeriesNumber=3)
    whole.write_bytes(whole.read_bytes()[:-20])
    assert list_series(folder)[2] == folder / "c.dcm"
    with pytest.raises(DataError, match="c.dcm"):
        read_stack(folder / "c.dcm")


def test_a_header_that_cannot_be_read_leaves_the_folder_whole(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    write_slices(folder, 2, 1, tag="a")
    write_slices(folder, 2, 2, tag="b")

    def fail(*args, **kwargs):
        raise OSError("unreadable")

    monkeypatch.setattr("espmedsam.data.series.pydicom.dcmread", fail)
    assert list_series(folder) == [folder]  # read as today: its reader names the file it cannot read
