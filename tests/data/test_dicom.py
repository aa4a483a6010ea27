from __future__ import annotations

import random
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from espmedsam.data.dicom import read_dicom_file, read_dicom_series
from espmedsam.data.stack import read_stack, write_masks
from espmedsam.errors import DataError, MissingDependencyError

STUDY, FRAME_OF_REFERENCE = generate_uid(), generate_uid()


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", **attributes) -> Path:
    """Write ``pixels`` ((H, W) / (N, H, W) gray, (H, W, 3) / (N, H, W, 3) colour) as a DICOM file."""
    color = photometric not in ("MONOCHROME1", "MONOCHROME2")
    frames = pixels.ndim == (4 if color else 3)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "", ""
    ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = STUDY, "1", "20240101", "120000"
    ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = generate_uid(), 1, "CT"
    ds.FrameOfReferenceUID, ds.InstanceNumber = FRAME_OF_REFERENCE, 1
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if "PixelData" not in attributes:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    elif attributes["PixelData"] is None:
        del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(dtype=np.uint16, shape=(4, 6), start=0, step=100) -> np.ndarray:
    return (start + step * np.arange(np.prod(shape))).reshape(shape).astype(dtype)


def test_monochrome2_uses_the_frame_range_and_monochrome1_is_inverted(tmp_path):
    pixels = ramp()
    mono2 = read_dicom_file(write_dicom(tmp_path / "a.dcm", pixels))
    mono1 = read_dicom_file(write_dicom(tmp_path / "b.dcm", pixels, photometric="MONOCHROME1"))
    assert mono2.frames.shape == (1, 4, 6) and mono2.frames.dtype == np.uint8 and mono2.kind == "dicom"
    assert mono2.frames[0, 0, 0] == 0 and mono2.frames[0, -1, -1] == 255
    np.testing.assert_array_equal(mono1.frames, 255 - mono2.frames)


def test_window_centre_and_width_clip_outside_values(tmp_path):
    pixels = np.array([[-1000, 0, 40, 79, 80, 1000]], np.int16)
    stack = read_dicom_file(write_dicom(tmp_path / "a.dcm", pixels, WindowCenter=40, WindowWidth=80))
    frame = stack.frames[0, 0]
    assert frame[0] == frame[1] == 0 and frame[4] == frame[5] == 255
    assert 126 <= frame[2] <= 130 and frame[3] > 250


def test_the_first_of_several_windows_is_used(tmp_path):
    pixels = np.array([[-1000, 0, 40, 80, 1000]], np.int16)
    path = write_dicom(tmp_path / "a.dcm", pixels, WindowCenter=[40, 400], WindowWidth=[80, 2000])
    assert list(read_dicom_file(path).frames[0, 0, [0, 1, 3, 4]]) == [0, 0, 255, 255]


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    # stored 532 -> 2 * 532 - 1024 = 40 HU, the window centre
    pixels = np.array([[0, 512, 532, 552, 4000]], np.uint16)
    path = write_dicom(
        tmp_path / "a.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=80
    )
    frame = read_dicom_file(path).frames[0, 0]
    assert frame[0] == frame[1] == 0 and frame[4] == 255 and 126 <= frame[2] <= 130


def test_voi_lut_sequence_maps_through_the_table(tmp_path):
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUTDescriptor: 4 entries from stored value 0, 16 bits
    item.add_new(0x00283006, "US", [0, 100, 200, 400])  # LUTData
    pixels = np.array([[0, 1, 2, 3, 9]], np.uint16)
    voi = {"VOILUTSequence": Sequence([item]), "WindowCenter": 1, "WindowWidth": 1}
    path = write_dicom(tmp_path / "a.dcm", pixels, **voi)
    assert list(read_dicom_file(path).frames[0, 0]) == [0, 64, 128, 255, 255]  # the LUT wins, as in pydicom


def test_rgb_frames_are_kept(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    stack = read_dicom_file(write_dicom(tmp_path / "a.dcm", rgb, photometric="RGB"))
    assert stack.frames.shape == (1, 5, 7, 3)
    np.testing.assert_array_equal(stack.frames[0], rgb)


def test_ybr_full_frames_are_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    stack = read_dicom_file(write_dicom(tmp_path / "a.dcm", ybr, photometric="YBR_FULL"))
    assert stack.frames.shape == (2, 5, 7, 3)
    assert np.abs(stack.frames.astype(int) - rgb).max() <= 2


def test_ybr_full_422_frames_are_upsampled_to_rgb(tmp_path):
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[:, :2], rgb[:, 2:] = [200, 30, 30], [30, 200, 30]
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    # two pixels share one Cb and Cr: Y0 Y1 Cb Cr
    pairs = [[*ybr[r, c : c + 2, 0], ybr[r, c, 1], ybr[r, c, 2]] for r in range(2) for c in (0, 2)]
    path = write_dicom(
        tmp_path / "a.dcm", rgb, photometric="YBR_FULL_422", PixelData=np.array(pairs, np.uint8).tobytes()
    )
    stack = read_dicom_file(path)
    assert np.abs(stack.frames[0].astype(int) - rgb).max() <= 2


def test_multi_frame_file_gives_one_frame_each_with_its_spacing(tmp_path):
    pixels = np.stack([ramp(step=s) for s in (1, 10, 100)])
    stack = read_dicom_file(write_dicom(tmp_path / "a.dcm", pixels, PixelSpacing=[0.5, 0.25]))
    assert stack.frames.shape == (3, 4, 6) and stack.spacing == (0.5, 0.25)
    assert stack.is_volume
    assert (stack.frames[:, 0, 0] == 0).all() and (stack.frames[:, -1, -1] == 255).all()


def test_enhanced_multi_frame_spacing_and_window_from_functional_groups(tmp_path):
    measures, voi, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.6], 2
    voi.WindowCenter, voi.WindowWidth = 40, 80
    shared.PixelMeasuresSequence, shared.FrameVOILUTSequence = Sequence([measures]), Sequence([voi])
    pixels = np.array([[[-1000, 40, 1000]], [[-1000, 40, 1000]]], np.int16)
    path = write_dicom(tmp_path / "a.dcm", pixels, SharedFunctionalGroupsSequence=Sequence([shared]))
    stack = read_dicom_file(path)
    assert stack.spacing == (0.8, 0.6)
    assert list(stack.frames[1, 0, [0, 2]]) == [0, 255] and 126 <= stack.frames[1, 0, 1] <= 130


def test_spacing_falls_back_to_imager_pixel_spacing_then_none(tmp_path):
    imager = read_dicom_file(write_dicom(tmp_path / "a.dcm", ramp(), ImagerPixelSpacing=[0.2, 0.3]))
    assert imager.spacing == (0.2, 0.3)
    assert read_dicom_file(write_dicom(tmp_path / "b.dcm", ramp())).spacing is None


def write_series(folder: Path, count: int = 5, *, series: str | None = None, seed: int = 0) -> list[int]:
    """Slices whose marker column is their position index, written in a shuffled file order."""
    series = series or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    for file_index, k in enumerate(order):
        pixels = np.zeros((4, 6), np.uint16)
        pixels[:, k] = 1000
        write_dicom(
            folder / f"{file_index:03d}.dcm",
            pixels,
            SeriesInstanceUID=series,
            ImagePositionPatient=[10.0, 20.0, 30.0 + 2.5 * k],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[0.5, 0.7],
            InstanceNumber=count - k if seed == 0 else file_index + 1,  # misleading: the position wins
        )
    return order


def test_series_is_sorted_by_position_along_the_slice_normal(tmp_path):
    order = write_series(tmp_path / "series")
    assert order != sorted(order)
    stack = read_dicom_series(tmp_path / "series")
    assert stack.frames.shape == (5, 4, 6) and stack.spacing == (0.5, 0.7)
    assert [int(np.argmax(frame[0])) for frame in stack.frames] == [0, 1, 2, 3, 4]
    assert stack.is_volume and stack.name == "series" and len(stack.reference) == 5


def test_series_without_positions_is_sorted_by_instance_number(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    series = generate_uid()
    for file_index, k in enumerate([3, 0, 4, 1, 2]):
        pixels = np.zeros((4, 6), np.uint16)
        pixels[:, k] = 1000
        write_dicom(folder / f"{file_index}.dcm", pixels, SeriesInstanceUID=series, InstanceNumber=k + 1)
    stack = read_dicom_series(folder)
    assert [int(np.argmax(frame[0])) for frame in stack.frames] == [0, 1, 2, 3, 4]


def test_series_skips_non_dicom_files(tmp_path):
    write_series(tmp_path / "series", 3)
    (tmp_path / "series" / "README.txt").write_text("not an image")
    (tmp_path / "series" / "notes").write_bytes(b"\0" * 200)
    assert read_dicom_series(tmp_path / "series").frames.shape == (3, 4, 6)


def test_two_series_in_one_folder_is_an_error(tmp_path):
    write_series(tmp_path / "mixed", 2)
    write_dicom(tmp_path / "mixed" / "other.dcm", ramp())
    with pytest.raises(DataError, match="2 DICOM series.*one folder per series"):
        read_dicom_series(tmp_path / "mixed")


def test_slices_of_different_sizes_are_an_error(tmp_path):
    series = generate_uid()
    (tmp_path / "s").mkdir()
    write_dicom(tmp_path / "s" / "a.dcm", ramp(shape=(4, 6)), SeriesInstanceUID=series)
    write_dicom(tmp_path / "s" / "b.dcm", ramp(shape=(5, 6)), SeriesInstanceUID=series)
    with pytest.raises(DataError, match="different sizes"):
        read_dicom_series(tmp_path / "s")


def test_a_folder_without_dicom_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no DICOM image"):
        read_dicom_series(tmp_path / "empty")


def test_file_without_pixel_data_is_an_error(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp(), PixelData=None)
    with pytest.raises(DataError, match=r"a\.dcm: DICOM file has no pixel data"):
        read_dicom_file(path)


def test_unreadable_dicom_is_a_data_error(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    with pytest.raises(DataError, match="broken.dcm"):
        read_dicom_file(path)


def test_compressed_pixel_data_without_a_decoder_names_the_packages(tmp_path, monkeypatch):
    from pydicom.encaps import encapsulate
    from pydicom.pixels.decoders.base import Decoder

    path = tmp_path / "a.dcm"
    write_dicom(path, ramp())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 20])
    ds.save_as(path, enforce_file_format=True)
    # pretend no plugin is installed, whatever this environment has
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(DataError, match="JPEG 2000.*dicom-compressed.*pylibjpeg-openjpeg.*python-gdcm"):
        read_dicom_file(path)


def test_series_mask_as_nifti_has_the_dicom_geometry(tmp_path):
    write_series(tmp_path / "series")
    stack = read_stack(tmp_path / "series")
    masks = np.zeros(stack.frames.shape, bool)
    masks[3, 1, 2] = True  # slice 3, row 1, column 2
    (path,) = write_masks(stack, masks, tmp_path / "out")
    assert path.name == "series_mask.nii.gz"
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    assert data.shape == (6, 4, 5) and data.dtype == np.uint8
    assert np.argwhere(data).tolist() == [[2, 1, 3]]
    assert image.header.get_zooms() == pytest.approx((0.7, 0.5, 2.5))
    # LPS (10, 20, 30 + 2.5 k) -> RAS: x and y negated
    expected = np.array([[-0.7, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-5)
    world = image.affine @ [2, 1, 3, 1]
    np.testing.assert_allclose(world[:3], [-(10 + 2 * 0.7), -(20 + 1 * 0.5), 30 + 3 * 2.5], atol=1e-5)


def test_file_mask_as_nifti_with_only_pixel_spacing_or_nothing(tmp_path):
    spaced = read_stack(write_dicom(tmp_path / "a.dcm", ramp(), PixelSpacing=[0.5, 0.25]))
    (path,) = write_masks(spaced, np.ones((1, 4, 6), bool), tmp_path / "out")
    image = nib.load(path)
    assert image.shape == (6, 4, 1) and np.asanyarray(image.dataobj).all()
    np.testing.assert_allclose(np.diag(image.affine), [0.25, 0.5, 1, 1])
    plain = read_stack(write_dicom(tmp_path / "b.dcm", ramp()))
    (path,) = write_masks(plain, np.zeros((1, 4, 6), bool), tmp_path / "out")
    np.testing.assert_allclose(nib.load(path).affine, np.eye(4))


def test_dicom_seg_is_written_and_readable(tmp_path):
    hd = pytest.importorskip("highdicom")
    write_series(tmp_path / "series", 3)
    stack = read_stack(tmp_path / "series")
    masks = np.zeros(stack.frames.shape, bool)
    masks[1, 1:3, 2:5] = True
    (path,) = write_masks(stack, masks, tmp_path / "out", dicom_format="seg")
    assert path.name == "series_seg.dcm" and list(path.parent.iterdir()) == [path]
    seg = hd.seg.segread(path)
    assert seg.SegmentSequence[0].SegmentLabel == "foreground"
    uids = [ds.SOPInstanceUID for ds in stack.reference]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), masks)


def test_dicom_seg_without_highdicom_names_the_package(tmp_path, monkeypatch):
    stack = read_stack(write_dicom(tmp_path / "a.dcm", ramp()))
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MissingDependencyError, match="pip install highdicom"):
        write_masks(stack, np.zeros((1, 4, 6), bool), tmp_path / "out", dicom_format="seg")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_enhanced_multi_frame_mask_as_nifti_uses_per_frame_positions(tmp_path):
    measures, orientation, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.8, 0.6], 3
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    per_frame = []
    for k in range(3):
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 4.0 * k]
        group.PlanePositionSequence = Sequence([position])
        per_frame.append(group)
    path = write_dicom(
        tmp_path / "a.dcm",
        np.stack([ramp()] * 3),
        SharedFunctionalGroupsSequence=Sequence([shared]),
        PerFrameFunctionalGroupsSequence=Sequence(per_frame),
    )
    (out,) = write_masks(read_stack(path), np.zeros((3, 4, 6), bool), tmp_path / "out")
    np.testing.assert_allclose(nib.load(out).affine, np.diag([-0.6, -0.8, 4.0, 1.0]), atol=1e-5)


def test_dicom_seg_refuses_frames_it_cannot_keep_apart(tmp_path):
    pytest.importorskip("highdicom")
    # a multi-frame file with no per-frame geometry: highdicom would merge its frames into one
    stack = read_stack(write_dicom(tmp_path / "a.dcm", np.stack([ramp()] * 3), PixelSpacing=[0.5, 0.5]))
    with pytest.raises(DataError, match="3 source frames; write the mask as NIfTI"):
        write_masks(stack, np.ones((3, 4, 6), bool), tmp_path / "out", dicom_format="seg")
    assert not any((tmp_path / "out").glob("*"))
