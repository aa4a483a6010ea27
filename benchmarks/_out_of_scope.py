"""Images that are none of the model's modalities, for the unknown-modality benchmark (offline, no download).

- ``pydicom``: pydicom's bundled test files that decode without extra packages (read as ``espmedsam
  predict`` reads DICOM: ``read_stack``), at least 32 px a side, one per distinct pixel content: CT, MR,
  a segmentation mask, colour-bar and flat test patterns. Its ultrasound files (``Modality`` US: colour
  Doppler, echocardiography, an obstetric screenshot) are a modality the model has, so they are listed
  apart as ``pydicom ultrasound`` and not counted.
- ``scikit-image``: ``skimage.data`` images that ship with the package (photographs, textures, a
  document page, astronomy, a CT phantom, synthetic patterns). Its microscopy and fundus images
  (immunohistochemistry, cell, microaneurysms, retina) are in scope and listed apart.
- ``rendered``: screenshots and documents drawn with PIL (text pages, windows, a spreadsheet, a chart, a
  terminal, a slide), seeded.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COUNTED = ("pydicom", "scikit-image", "rendered")
SKIMAGE_OUT = (
    "astronaut", "binary_blobs", "brick", "camera", "checkerboard", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "logo", "moon", "page", "rocket",
    "shepp_logan_phantom", "text",
)  # fmt: skip
SKIMAGE_IN_SCOPE = ("immunohistochemistry", "cell", "microaneurysms", "retina")


@dataclass(frozen=True)
class Sample:
    """One input: (N, H, W[, 3]) uint8 frames (N > 1 for a multi-frame file), its source and name."""

    source: str
    name: str
    frames: np.ndarray


def out_of_scope_images() -> list[Sample]:
    """Every sample of the three sources and of the two in-scope groups (see the module docstring)."""
    return [*pydicom_samples(), *skimage_samples(), *rendered_samples()]


def pydicom_samples(min_side: int = 32) -> list[Sample]:
    import pydicom
    from pydicom.data import get_testdata_files

    from espmedsam.data.stack import read_stack

    samples, seen = [], set()
    for path in sorted(get_testdata_files(), key=lambda p: Path(p).name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                frames = read_stack(Path(path)).frames
                modality = str(getattr(pydicom.dcmread(path, stop_before_pixels=True), "Modality", ""))
            except Exception:  # needs a codec that is not installed, or not an image
                continue
        digest = hashlib.sha1(frames.tobytes()).hexdigest()
        if min(frames.shape[1:3]) < min_side or digest in seen:
            continue
        seen.add(digest)
        source = "pydicom ultrasound" if modality == "US" else "pydicom"
        samples.append(Sample(source, Path(path).name, frames))
    return samples


def skimage_samples() -> list[Sample]:
    import skimage.data

    samples = []
    for group, names in (("scikit-image", SKIMAGE_OUT), ("scikit-image in scope", SKIMAGE_IN_SCOPE)):
        for name in names:
            samples.append(Sample(group, name, _uint8(np.asarray(getattr(skimage.data, name)()))[None]))
    return samples


def _uint8(array: np.ndarray) -> np.ndarray:
    """Bool, float or RGBA arrays -> (H, W) or (H, W, 3) uint8 (alpha composited on white)."""
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        span = float(array.max() - array.min()) or 1.0
        return ((array - array.min()) / span * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:
        alpha = array[..., 3:] / 255.0
        return (array[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return array


def rendered_samples(seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    drawings = (_document, _two_columns, _window, _code_editor, _spreadsheet, _bar_chart, _dialog,
                _web_page, _terminal, _slide)  # fmt: skip
    return [Sample("rendered", f.__name__.strip("_"), np.asarray(f(rng))[None]) for f in drawings]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _words(rng: np.random.Generator, n: int) -> str:
    vocabulary = "the of model image data report patient result figure table section method value".split()
    return " ".join(rng.choice(vocabulary, n))


def _document(rng: np.random.Generator) -> Image.Image:
    page = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(page)
    draw.text((70, 60), "Quarterly Report", fill="black", font=_font(36))
    for i in range(40):
        draw.text((70, 130 + 23 * i), _words(rng, int(rng.integers(6, 12))), fill="black", font=_font(16))
    return page


def _two_columns(rng: np.random.Generator) -> Image.Image:
    page = Image.new("RGB", (1000, 1300), (250, 248, 240))
    draw = ImageDraw.Draw(page)
    draw.text((60, 40), "A Study of Things", fill="black", font=_font(40))
    for column in (60, 520):
        for i in range(48):
            draw.text((column, 120 + 24 * i), _words(rng, 5), fill=(30, 30, 30), font=_font(15))
    return page


def _window(rng: np.random.Generator) -> Image.Image:
    screen = Image.new("RGB", (1280, 800), (58, 110, 165))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((100, 80, 1100, 700), fill=(236, 236, 236), outline="black")
    draw.rectangle((100, 80, 1100, 110), fill=(40, 40, 120))
    draw.text((110, 86), "Settings", fill="white", font=_font(18))
    for i in range(6):
        y = 140 + 80 * i
        draw.text((140, y + 8), f"Option {i + 1}", fill="black", font=_font(18))
        draw.rectangle((400, y, 1000, y + 40), fill="white", outline=(120, 120, 120))
    for x, label in ((760, "OK"), (900, "Cancel")):
        draw.rounded_rectangle((x, 630, x + 120, 670), 8, fill=(210, 210, 210), outline="black")
        draw.text((x + 35, 640), label, fill="black", font=_font(18))
    return screen


def _code_editor(rng: np.random.Generator) -> Image.Image:
    screen = Image.new("RGB", (1200, 800), (30, 30, 30))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 220, 800), fill=(37, 37, 38))
    colours = [(86, 156, 214), (206, 145, 120), (220, 220, 170), (156, 220, 254), (106, 153, 85)]
    for i in range(36):
        draw.text((10, 10 + 21 * i), f"file_{i}.py", fill=(200, 200, 200), font=_font(14))
        indent = 4 * int(rng.integers(0, 4))
        text = " " * indent + _words(rng, int(rng.integers(2, 7)))
        draw.text((240, 10 + 21 * i), text, fill=colours[i % len(colours)], font=_font(15))
    return screen


def _spreadsheet(rng: np.random.Generator) -> Image.Image:
    sheet = Image.new("RGB", (1100, 700), "white")
    draw = ImageDraw.Draw(sheet)
    for row in range(28):
        for col in range(10):
            x, y = 40 + 105 * col, 20 + 24 * row
            fill = (230, 230, 230) if row == 0 or col == 0 else "white"
            draw.rectangle((x, y, x + 105, y + 24), fill=fill, outline=(180, 180, 180))
            text = chr(65 + col) if row == 0 else str(row) if col == 0 else f"{rng.uniform(0, 999):.1f}"
            draw.text((x + 6, y + 5), text, fill="black", font=_font(13))
    return sheet


def _bar_chart(rng: np.random.Generator) -> Image.Image:
    chart = Image.new("RGB", (900, 600), "white")
    draw = ImageDraw.Draw(chart)
    draw.line((80, 520, 860, 520), fill="black", width=2)
    draw.line((80, 40, 80, 520), fill="black", width=2)
    for i, height in enumerate(rng.uniform(60, 460, 9)):
        x = 110 + 82 * i
        draw.rectangle((x, 520 - height, x + 55, 520), fill=(31, 119, 180))
        draw.text((x + 12, 530), f"Q{i + 1}", fill="black", font=_font(16))
    draw.text((300, 10), "Sales per quarter", fill="black", font=_font(22))
    return chart


def _dialog(rng: np.random.Generator) -> Image.Image:
    screen = Image.new("RGB", (800, 600), (245, 245, 250))
    draw = ImageDraw.Draw(screen)
    draw.rounded_rectangle((200, 120, 600, 480), 16, fill="white", outline=(200, 200, 210), width=2)
    draw.text((330, 150), "Sign in", fill="black", font=_font(28))
    for i, label in enumerate(("Email", "Password")):
        draw.text((240, 210 + 80 * i), label, fill=(90, 90, 90), font=_font(16))
        draw.rounded_rectangle((240, 235 + 80 * i, 560, 270 + 80 * i), 6, outline=(160, 160, 170))
    draw.rounded_rectangle((240, 400, 560, 440), 8, fill=(0, 120, 215))
    draw.text((370, 410), "Continue", fill="white", font=_font(18))
    return screen


def _web_page(rng: np.random.Generator) -> Image.Image:
    screen = Image.new("RGB", (1366, 768), "white")
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 1366, 60), fill=(33, 37, 41))
    for i, item in enumerate(("Home", "News", "Shop", "About")):
        draw.text((40 + 110 * i, 18), item, fill="white", font=_font(20))
    for i in range(3):
        x = 60 + 430 * i
        colour = tuple(int(c) for c in rng.integers(80, 220, 3))
        draw.rectangle((x, 100, x + 380, 330), fill=colour)
        for j in range(8):
            draw.text((x, 350 + 24 * j), _words(rng, 5), fill=(50, 50, 50), font=_font(16))
    return screen


def _terminal(rng: np.random.Generator) -> Image.Image:
    screen = Image.new("RGB", (1000, 640), (12, 12, 12))
    draw = ImageDraw.Draw(screen)
    for i in range(30):
        draw.text(
            (12, 8 + 21 * i), "$ " + _words(rng, int(rng.integers(2, 9))), fill=(0, 220, 0), font=_font(16)
        )
    return screen


def _slide(rng: np.random.Generator) -> Image.Image:
    slide = Image.new("RGB", (1280, 720), (0, 51, 102))
    draw = ImageDraw.Draw(slide)
    draw.text((80, 60), "Project Update", fill="white", font=_font(64))
    for i in range(5):
        draw.ellipse((90, 215 + 80 * i, 106, 231 + 80 * i), fill=(255, 200, 0))
        draw.text((130, 205 + 80 * i), _words(rng, 6), fill="white", font=_font(34))
    return slide
