from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from espmedsam.data.io import read_image, read_mask, read_mask_values, write_png
from espmedsam.errors import DataError

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
@pytest.mark.parametrize("array", [GRAY, RGB], ids=["gray", "rgb"])
def test_lossless_8bit_round_trip(tmp_path, suffix, array):
    path = tmp_path / f"a{suffix}"
    Image.fromarray(array).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and np.array_equal(out, array)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_rgba_kept(tmp_path, suffix):
    Image.fromarray(RGBA).save(tmp_path / f"a{suffix}")
    assert np.array_equal(read_image(tmp_path / f"a{suffix}"), RGBA)


def test_jpeg_gray_and_rgb(tmp_path):
    Image.fromarray(GRAY).save(tmp_path / "g.jpg", quality=100)
    Image.fromarray(RGB).save(tmp_path / "c.jpeg", quality=100)
    assert read_image(tmp_path / "g.jpg").shape == (6, 8)
    rgb = read_image(tmp_path / "c.jpeg")
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8


def test_16bit_png_is_rescaled(tmp_path):
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode in ("I;16", "I")
    assert np.array_equal(read_image(tmp_path / "a.png"), np.array([[0, 64], [128, 255]], np.uint8))


def test_float_tiff_is_rescaled(tmp_path):
    values = np.array([[-1.0, 0.0], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "a.tif")
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 128], [191, 255]]


def test_palette_image_becomes_rgb(tmp_path):
    image = Image.fromarray(RGB).quantize(4)
    image.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (6, 8, 3)
    assert np.array_equal(out, np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".gif"])
def test_read_mask_any_nonzero(tmp_path, suffix):
    values = np.array([[0, 1], [255, 0]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / f"m{suffix}")
    assert read_mask(tmp_path / f"m{suffix}").tolist() == [[False, True], [True, False]]


def test_read_mask_16bit_not_rescaled_and_threshold(tmp_path):
    Image.fromarray(np.array([[3, 4], [0, 60000]], np.uint16)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[True, True], [False, True]]
    assert read_mask(tmp_path / "m.png", threshold=3).tolist() == [[False, True], [False, True]]


def test_read_mask_rgb_any_channel_alpha_ignored(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 0] = 200
    rgba[1, 1, 2] = 1
    Image.fromarray(rgba).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[True, False], [False, True]]
    assert read_mask_values(tmp_path / "m.png").shape == (2, 2, 4)


def test_read_mask_palette_and_bilevel(tmp_path):
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == [[False, True], [True, False]]
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert read_mask(tmp_path / "b.png").tolist() == [[True, False]]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.txt", b"x", "unsupported image type"),
        ("a.png", b"not a png", "cannot read image"),
        ("b.png", None, "no such file"),
    ],
)
def test_read_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_mask_rejects_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="unsupported image type"):
        read_mask(tmp_path / "m.npy")


def test_write_png_round_trip(tmp_path):
    path = write_png(tmp_path / "sub" / "x.png", RGB)
    assert np.array_equal(read_image(path), RGB)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]
