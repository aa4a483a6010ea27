from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from espmedsam.data import io
from espmedsam.data.io import read_image, read_mask, read_mask_values, read_pages, write_png, write_tiff_pages
from espmedsam.errors import DataError, InputError

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


def _pages(count: int, shape=(6, 8), step: int = 40) -> list[np.ndarray]:
    """Constant pages 0, step, 2 step...: each page's value says its place in the file."""
    return [np.full(shape, i * step, np.uint8) for i in range(count)]


def _save_pages(path, pages: list[np.ndarray], **options) -> None:
    images = [Image.fromarray(page) for page in pages]
    images[0].save(path, save_all=True, append_images=images[1:], **options)


@pytest.mark.parametrize("name", ["stack.tif", "anim.gif", "anim.png"], ids=["tiff", "gif", "apng"])
def test_every_page_is_read_in_file_order(tmp_path, name):
    _save_pages(tmp_path / name, [np.stack([page] * 3, axis=-1) for page in _pages(4)])
    pages = read_pages(tmp_path / name)
    assert pages.shape == (4, 6, 8, 3) and pages.dtype == np.uint8
    assert [int(page[0, 0, 0]) for page in pages] == [0, 40, 80, 120]


def test_a_single_image_is_one_page_as_read_image_reads_it(tmp_path):
    Image.fromarray(RGBA).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_pages(tmp_path / "a.png"), read_image(tmp_path / "a.png")[None])


def test_one_page_alone_and_a_missing_page(tmp_path):
    _save_pages(tmp_path / "s.tif", _pages(3))
    np.testing.assert_array_equal(read_pages(tmp_path / "s.tif", page=2), np.full((1, 6, 8), 80, np.uint8))
    with pytest.raises(DataError, match=r"s.tif: no page 3 \(3 pages: pages 0 to 2\)"):
        read_pages(tmp_path / "s.tif", page=3)
    with pytest.raises(InputError, match="page must be 0 or more"):
        read_pages(tmp_path / "s.tif", page=-1)


def test_pages_of_different_sizes_are_one_line_error_yet_each_page_reads(tmp_path):
    _save_pages(tmp_path / "s.tif", [*_pages(2), np.zeros((5, 8), np.uint8)])
    with pytest.raises(DataError, match=r"s.tif: pages of different sizes \(page 0 is 8x6, page 2 is 8x5\)"):
        read_pages(tmp_path / "s.tif")
    assert read_pages(tmp_path / "s.tif", page=2).shape == (1, 5, 8)


def test_pages_over_the_stack_cap_are_refused_but_one_page_is_read(tmp_path, monkeypatch):
    _save_pages(tmp_path / "s.tif", _pages(3))
    monkeypatch.setattr(io, "MAX_STACK_PIXELS", 2 * 6 * 8)
    with pytest.raises(
        DataError, match=r"s.tif: too large: 3 pages of 8x6 = 144 pixels, over the limit of 96"
    ):
        read_pages(tmp_path / "s.tif")
    assert read_pages(tmp_path / "s.tif", page=1).shape == (1, 6, 8)


def test_gray_pages_among_colour_become_rgb_and_deep_pages_share_one_scale(tmp_path):
    _save_pages(tmp_path / "mixed.tif", [GRAY, RGB])
    pages = read_pages(tmp_path / "mixed.tif")
    assert pages.shape == (2, 6, 8, 3)
    np.testing.assert_array_equal(pages[0], np.stack([GRAY] * 3, axis=-1))
    deep = [np.full((2, 2), 1000, np.uint16), np.full((2, 2), 3000, np.uint16), np.zeros((2, 2), np.uint16)]
    _save_pages(tmp_path / "deep.tif", deep)
    assert [int(page[0, 0]) for page in read_pages(tmp_path / "deep.tif")] == [85, 255, 0]


def test_read_image_still_refuses_several_frames(tmp_path):
    _save_pages(tmp_path / "s.tif", _pages(2))
    with pytest.raises(DataError, match="holds 2 frames"):
        read_image(tmp_path / "s.tif")


def test_write_tiff_pages_round_trip(tmp_path):
    masks = np.stack(
        [np.eye(5, dtype=np.uint8) * 255, np.zeros((5, 5), np.uint8), np.full((5, 5), 255, np.uint8)]
    )
    path = write_tiff_pages(tmp_path / "m.tif", masks)
    np.testing.assert_array_equal(read_pages(path), masks)
    assert not list(tmp_path.glob("*.tmp"))
