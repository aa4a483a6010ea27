from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from espmedsam.data.nifti import read_nifti
from espmedsam.data.stack import read_stack, write_masks
from espmedsam.errors import DataError, InputError

AFFINE = np.array([[0.5, 0, 0, -10], [0, 0.7, 0, 5], [0, 0, 2.0, 30], [0, 0, 0, 1]])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    nib.save(image, path)
    return path


def one_bright_voxel(shape, index) -> np.ndarray:
    data = np.zeros(shape, np.float32)
    data[index] = 1000
    return data


# (axis, the voxel that frame n, row r, column c comes from): rows follow the second in-plane axis
VOXEL_OF = {
    0: lambda n, r, c: (n, c, r),
    1: lambda n, r, c: (c, n, r),
    2: lambda n, r, c: (c, r, n),
}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_3d_round_trip_along_each_axis(tmp_path, axis):
    shape = (4, 5, 6)
    voxel = VOXEL_OF[axis](2, 1, 3)
    path = save(tmp_path / "ct.nii.gz", one_bright_voxel(shape, voxel))
    stack = read_nifti(path, axis=axis)
    in_plane = [a for a in range(3) if a != axis]
    assert stack.frames.shape == (shape[axis], shape[in_plane[1]], shape[in_plane[0]])
    assert stack.kind == "nifti" and stack.axis == axis and stack.is_volume and stack.name == "ct"
    zooms = (0.5, 0.7, 2.0)
    assert stack.spacing == pytest.approx((zooms[in_plane[1]], zooms[in_plane[0]]))
    # the bright voxel shows at frame 2, row 1, column 3; all else is dark
    assert np.argwhere(stack.frames == 255).tolist() == [[2, 1, 3]]
    masks = stack.frames == 255
    (out,) = write_masks(stack, masks, tmp_path / "out")
    assert out.name == "ct_mask.nii.gz"
    written = nib.load(out)
    data = np.asanyarray(written.dataobj)
    assert data.shape == shape and data.dtype == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE)
    assert np.argwhere(data).tolist() == [list(voxel)]


def test_2d_round_trip(tmp_path):
    data = one_bright_voxel((7, 5), (6, 1))
    stack = read_stack(save(tmp_path / "xray.nii", data))
    assert stack.frames.shape == (1, 5, 7) and not stack.is_volume and stack.spacing == (0.7, 0.5)
    assert np.argwhere(stack.frames == 255).tolist() == [[0, 1, 6]]
    (out,) = write_masks(stack, stack.frames == 255, tmp_path / "out")
    written = nib.load(out)
    assert written.shape == (7, 5) and np.argwhere(np.asanyarray(written.dataobj)).tolist() == [[6, 1]]
    np.testing.assert_allclose(written.affine, AFFINE)


def test_a_single_slice_volume_is_cut_along_its_thin_axis(tmp_path):
    stack = read_nifti(save(tmp_path / "one.nii.gz", one_bright_voxel((1, 5, 6), (0, 2, 3))), axis=2)
    assert stack.frames.shape == (1, 6, 5) and stack.axis == 0
    (out,) = write_masks(stack, stack.frames == 255, tmp_path / "out")
    assert np.argwhere(np.asanyarray(nib.load(out).dataobj)).tolist() == [[0, 2, 3]]


def test_a_4d_file_of_one_volume_reads_as_3d_and_writes_3d(tmp_path):
    stack = read_nifti(save(tmp_path / "v.nii.gz", one_bright_voxel((4, 5, 6, 1), (1, 2, 3, 0))))
    assert stack.frames.shape == (6, 5, 4)
    (out,) = write_masks(stack, stack.frames == 255, tmp_path / "out")
    assert nib.load(out).shape == (4, 5, 6)


def test_4d_is_an_error(tmp_path):
    with pytest.raises(DataError, match="4D NIfTI with 2 volumes"):
        read_nifti(save(tmp_path / "v.nii.gz", np.zeros((4, 5, 6, 2), np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_an_error(tmp_path, bad):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = bad
    with pytest.raises(DataError, match="NaN or infinite"):
        read_nifti(save(tmp_path / "v.nii.gz", data))


def test_bad_axis_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="axis"):
        read_nifti(save(tmp_path / "v.nii.gz", np.zeros((4, 5, 6), np.float32)), axis=3)


def test_unreadable_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="broken.nii.gz: cannot read NIfTI"):
        read_nifti(path)


def test_window_is_the_volume_percentiles_shared_by_all_slices(tmp_path):
    data = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    data[0, 0, 0], data[9, 9, 9] = -1e6, 1e6  # outliers beyond the 0.5 / 99.5 percentiles
    frames = read_nifti(save(tmp_path / "v.nii.gz", data)).frames
    low, high = np.percentile(data, [0.5, 99.5])
    assert frames[0, 0, 0] == 0 and frames[9, 9, 9] == 255
    # the middle of the window maps to mid-gray, the same in every slice
    middle = data[4, 5, 5]
    assert abs(int(frames[5, 5, 4]) - round((middle - low) / (high - low) * 255)) <= 1


def test_scaled_integer_input_writes_plain_labels(tmp_path):
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), AFFINE)
    image.header.set_slope_inter(2.0, -100.0)
    nib.save(image, tmp_path / "s.nii.gz")
    stack = read_nifti(tmp_path / "s.nii.gz")
    masks = np.zeros(stack.frames.shape, bool)
    masks[0, 0, 0] = True
    written = nib.load(write_masks(stack, masks, tmp_path / "out")[0])
    assert set(np.unique(written.get_fdata())) == {0.0, 1.0}
    assert written.header.get_zooms() == pytest.approx((0.5, 0.7, 2.0))


def test_rgb_nifti_gives_colour_frames(tmp_path):
    rgb = np.zeros((4, 5, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb[3, 1, 0] = (200, 10, 20)
    nib.save(nib.Nifti1Image(rgb, AFFINE), tmp_path / "rgb.nii.gz")
    stack = read_nifti(tmp_path / "rgb.nii.gz")
    assert stack.frames.shape == (2, 5, 4, 3)
    assert stack.frames[0, 1, 3].tolist() == [200, 10, 20] and stack.frames.sum() == 230


def test_masks_of_the_wrong_shape_are_an_input_error(tmp_path):
    stack = read_nifti(save(tmp_path / "v.nii.gz", np.zeros((4, 5, 6), np.float32)))
    with pytest.raises(InputError, match="masks of shape"):
        write_masks(stack, np.zeros((6, 4, 5), bool), tmp_path / "out")
