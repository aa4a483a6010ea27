from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from espmedsam.data.stack import ImageStack, read_stack, write_masks
from espmedsam.errors import DataError, InputError


def write_gray_dicom(path: Path, pixels: np.ndarray, *, preamble: bool = True) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare dataset, as old archives hold: no preamble, no file meta
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def test_gray_png_gives_one_frame_and_a_png_mask_of_its_size(tmp_path):
    Image.fromarray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)).save(tmp_path / "xray_a.png")
    stack = read_stack(tmp_path / "xray_a.png")
    assert stack.frames.shape == (1, 20, 30) and stack.kind == "image" and stack.name == "xray_a"
    assert not stack.is_volume and stack.spacing is None and stack.reference is None
    masks = np.zeros((1, 20, 30), bool)
    masks[0, 5:10, 7:9] = True
    (path,) = write_masks(stack, masks, tmp_path / "out")
    assert path.name == "xray_a_mask.png"
    written = np.asarray(Image.open(path))
    assert written.shape == (20, 30) and set(np.unique(written)) == {0, 255}
    np.testing.assert_array_equal(written == 255, masks[0])


def test_rgb_and_rgba_images_give_rgb_frames(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        stack = read_stack(tmp_path / name)
        assert stack.frames.shape == (1, 8, 9, 3) and stack.frames.flags.c_contiguous
        np.testing.assert_array_equal(stack.frames[0], rgba[..., :3])


def test_dicom_is_told_by_its_preamble_whatever_the_name(tmp_path):
    pixels = np.arange(12).reshape(3, 4) * 100
    for name in ("1.2.826.0.1.3680043.8", "scan.img"):
        stack = read_stack(write_gray_dicom(tmp_path / name, pixels))
        assert stack.kind == "dicom" and stack.name == name.removesuffix(".dcm")
        assert stack.frames[0, 0, 0] == 0 and stack.frames[0, -1, -1] == 255
    assert read_stack(write_gray_dicom(tmp_path / "slice.dcm", pixels)).name == "slice"


def test_a_dcm_file_without_preamble_is_read(tmp_path):
    stack = read_stack(write_gray_dicom(tmp_path / "raw.dcm", np.eye(4) * 100, preamble=False))
    assert stack.kind == "dicom" and stack.frames.shape == (1, 4, 4) and stack.frames[0, 1, 1] == 255


def test_a_dicom_folder_is_a_series(tmp_path):
    (tmp_path / "case7").mkdir()
    write_gray_dicom(tmp_path / "case7" / "IM0001", np.ones((3, 4)))
    stack = read_stack(tmp_path / "case7")
    assert stack.kind == "dicom" and stack.name == "case7" and stack.is_volume
    (path,) = write_masks(stack, np.ones((1, 3, 4), bool), tmp_path / "out")
    assert path.name == "case7_mask.nii.gz" and nib.load(path).shape == (4, 3, 1)


def test_nifti_is_dispatched_and_named_without_its_suffixes(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "brain.T1.nii.gz")
    stack = read_stack(tmp_path / "brain.T1.nii.gz", axis=0)
    assert stack.kind == "nifti" and stack.name == "brain.T1" and stack.frames.shape == (4, 6, 5)


def test_missing_and_unknown_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_stack(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_stack(tmp_path / "notes.txt")


def test_bad_masks_or_format_are_input_errors(tmp_path):
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "a.png")
    stack = read_stack(tmp_path / "a.png")
    with pytest.raises(InputError, match=r"masks of shape \(1, 5, 4\)"):
        write_masks(stack, np.zeros((1, 5, 4), bool), tmp_path)
    with pytest.raises(InputError, match="unknown DICOM mask format 'rt'"):
        write_masks(stack, np.zeros((1, 4, 5), bool), tmp_path, dicom_format="rt")


def test_frames_must_be_uint8_stacks():
    with pytest.raises(InputError, match="uint8"):
        ImageStack(np.zeros((4, 5), np.uint8), Path("a.png"), "image")
    with pytest.raises(InputError, match="kind"):
        ImageStack(np.zeros((1, 4, 5), np.uint8), Path("a.png"), "video")


def test_a_failed_nifti_write_leaves_no_file(tmp_path, monkeypatch):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    stack = read_stack(tmp_path / "v.nii.gz")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("espmedsam.data.nifti.gzip.compress", fail)
    with pytest.raises(OSError, match="disk full"):
        write_masks(stack, np.zeros((6, 5, 4), bool), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def _page_stack(path: Path, count: int = 3, shape=(6, 8)) -> Path:
    """``count`` gray pages whose value says their place: 0, 50, 100..."""
    pages = [Image.fromarray(np.full(shape, 50 * i, np.uint8)) for i in range(count)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


@pytest.mark.parametrize("name", ["pages.tif", "anim.gif"])
def test_a_multi_page_image_is_a_stack_of_pages_and_its_mask_a_multi_page_tiff(tmp_path, name):
    stack = read_stack(_page_stack(tmp_path / name))
    assert stack.kind == "image" and stack.is_volume and stack.name == Path(name).stem
    assert stack.frames.shape[:3] == (3, 6, 8)
    assert [int(frame.flat[0]) for frame in stack.frames] == [0, 50, 100]
    masks = np.zeros((3, 6, 8), bool)
    for i in range(3):
        masks[i, i, :] = True  # page i: row i
    (path,) = write_masks(stack, masks, tmp_path / "out")
    assert path.name == f"{Path(name).stem}_mask.tif"
    with Image.open(path) as written:
        assert written.n_frames == 3
        for i in range(3):
            written.seek(i)
            page = np.asarray(written)
            assert set(np.unique(page)) == {0, 255} and np.array_equal(page == 255, masks[i])


def test_one_page_is_a_2d_image_named_after_its_page(tmp_path):
    stack = read_stack(_page_stack(tmp_path / "pages.tif"), page=1)
    assert stack.frames.shape == (1, 6, 8) and int(stack.frames[0, 0, 0]) == 50
    assert not stack.is_volume and stack.name == "pages_page1" and stack.page == 1
    (path,) = write_masks(stack, np.ones((1, 6, 8), bool), tmp_path / "out")
    assert path.name == "pages_page1_mask.png"


def test_a_page_of_a_volume_or_beyond_the_last_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(InputError, match=r"v.nii.gz: a page \(--page\) is read from multi-page images"):
        read_stack(tmp_path / "v.nii.gz", page=0)
    with pytest.raises(DataError, match="no page 3"):
        read_stack(_page_stack(tmp_path / "pages.tif"), page=3)


def test_pages_of_different_sizes_are_a_data_error(tmp_path):
    pages = [Image.new("L", (8, 6)), Image.new("L", (8, 7))]
    pages[0].save(tmp_path / "odd.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match="pages of different sizes"):
        read_stack(tmp_path / "odd.tif")
