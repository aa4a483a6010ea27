"""The page of ``espmedsam serve`` in a real browser: Debian's chromium driven by playwright, offline.

The browser is the system's (``ESPMEDSAM_CHROMIUM``, else chromium on the PATH): playwright's own builds
are never downloaded. Without one the tests are skipped, unless ``ESPMEDSAM_REQUIRE_BROWSER=1`` (CI).
``ESPMEDSAM_SCREENSHOT=PATH`` also saves the screenshot of the page there (the docs' picture).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

sync_api = pytest.importorskip("playwright.sync_api")

from espmedsam.cli import app as cli_app  # noqa: E402
from espmedsam.data.io import read_image  # noqa: E402

DONE_TIMEOUT_MS = 60_000  # the example takes ~2 s; a loaded CI machine may take far longer
COUNT_OVERLAY = """() => {
    const canvas = document.getElementById('overlay-canvas');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let count = 0, sum = 0;
    for (let i = 3; i < data.length; i += 4) {
        if (data[i] > 0) count++;
        sum += data[i - 3] + 3 * data[i - 2] + 7 * data[i - 1] + 11 * data[i];
    }
    return {count, sum, width: canvas.width, height: canvas.height};
}"""


def _chromium() -> str | None:
    named = os.environ.get("ESPMEDSAM_CHROMIUM")
    if named:  # one that is not there counts as none: skipped, or failed under ESPMEDSAM_REQUIRE_BROWSER
        return named if os.access(named, os.X_OK) else None
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if not executable:
        named = os.environ.get("ESPMEDSAM_CHROMIUM")
        message = f"no chromium at ESPMEDSAM_CHROMIUM={named}" if named else "no chromium on the PATH"
        message += " (set ESPMEDSAM_CHROMIUM, or install Debian's chromium)"
        if os.environ.get("ESPMEDSAM_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser, page_url):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.goto(page_url)
    tab.wait_for_function("document.querySelectorAll('#modality option').length > 1")
    yield tab
    context.close()
    assert not problems, f"uncaught errors on the page: {problems}"


def upload(page, files, count: int, state: str = "done") -> None:
    """Choose ``files`` and wait until the list has ``count`` items and the one shown reached ``state``."""
    page.set_input_files("#file-input", files)
    page.wait_for_function(
        "([count, state]) => document.querySelectorAll('.result-item').length === count"
        " && document.body.dataset.state === state",
        arg=[count, state],
        timeout=DONE_TIMEOUT_MS,
    )


def overlay(page) -> dict:
    return page.evaluate(COUNT_OVERLAY)


def wait_overlay(page, condition: str) -> dict:
    """Wait until the overlay's pixels meet ``condition`` (on ``s``: {count, sum}); redraws go by frames."""
    page.wait_for_function(f"() => {{ const s = ({COUNT_OVERLAY})(); return {condition}; }}")
    return overlay(page)


def first_number(text: str) -> int:
    return int(re.search(r"[\d,]+", text).group().replace(",", ""))


def shown_modality(page) -> str:
    return page.text_content("#result-modality").split()[0]


def test_upload_shows_the_mask_over_the_image(page, example):
    upload(page, str(example), 1)
    stats = overlay(page)
    with Image.open(example) as image:
        assert (stats["width"], stats["height"]) == image.size
    area = first_number(page.text_content("#result-area"))
    assert area > 0
    assert stats["count"] == area  # filled at 50 %: every mask pixel, and only those
    assert shown_modality(page) in page.eval_on_selector_all("#modality option", "o => o.map(e => e.value)")
    assert page.text_content("#result-probability").startswith("p = ")  # chosen by the classifier
    assert "round trip" in page.text_content("#result-time")
    assert page.text_content(".result-item .result-status") == "done"
    timing = page.evaluate("window.espmedsamTiming")
    assert timing["file"] == example.name and timing["uploadToOverlayMs"] > 0 and timing["serverSeconds"] > 0
    assert page.is_hidden("#slice-control") and page.is_hidden("#error")


def wait_quality(page, name: str) -> None:
    """Wait until the page has the quality score of ``name`` (it follows the overlay)."""
    page.wait_for_function(
        "name => window.espmedsamQuality && window.espmedsamQuality.file === name", arg=name
    )


def test_the_quality_score_follows_the_overlay(page, example, predictor):
    upload(page, str(example), 1)
    wait_quality(page, example.name)
    _, score = predictor.predict_logits_with_quality(read_image(example), shown_modality(page))
    assert page.text_content("#result-quality") == f"predicted Dice {score:.2f}"
    overlay_ms = page.evaluate("window.espmedsamTiming.uploadToOverlayMs")
    assert page.evaluate("window.espmedsamQuality.uploadToQualityMs") >= overlay_ms


def test_downloads_are_the_cli_mask_and_the_overlay(page, example, tmp_path):
    upload(page, str(example), 1)
    with page.expect_download() as info:
        page.click("#download-mask")
    download = info.value
    assert download.suggested_filename == f"{example.stem}_mask.png"
    saved = Path(download.path()).read_bytes()

    result = CliRunner().invoke(
        cli_app, ["predict", str(example), "--modality", shown_modality(page), "--out", str(tmp_path / "cli")]
    )
    assert result.exit_code == 0, result.output
    assert saved == (tmp_path / "cli" / f"{example.stem}_mask.png").read_bytes()

    with page.expect_download() as info:
        page.click("#download-overlay")
    picture = Path(info.value.path()).read_bytes()
    assert picture.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(example) as image, Image.open(io.BytesIO(picture)) as drawn:
        assert drawn.size == image.size


def test_a_broken_file_shows_the_error_and_the_next_file_works(page, example):
    broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image"}
    upload(page, [broken], 1, state="error")
    assert page.is_visible("#error")
    assert "not a supported file" in page.text_content("#error")
    assert page.text_content(".result-item .result-status") == "error"

    upload(page, str(example), 2)
    assert page.is_hidden("#error")
    assert overlay(page)["count"] > 0
    page.click(".result-item >> nth=0")  # the broken one can still be looked at
    page.wait_for_function("document.body.dataset.state === 'error'")
    assert "broken.png" in page.text_content("#error")


def test_display_options_change_the_overlay(page, example):
    upload(page, str(example), 1)
    filled = overlay(page)
    assert filled["count"] > 0

    page.focus("#opacity")
    page.keyboard.press("Home")  # the slider works from the keyboard
    wait_overlay(page, "s.count === 0")
    assert page.text_content("#opacity-value") == "0 %"

    page.check("#contour-only")  # drawn at full opacity whatever the slider says
    contour = wait_overlay(page, "s.count > 0")
    assert contour["count"] < filled["count"]

    page.uncheck("#contour-only")
    page.fill("#opacity", "50")
    wait_overlay(page, f"s.count === {filled['count']}")
    assert page.is_enabled("#patch-map")
    page.check("#patch-map")
    heat = wait_overlay(page, f"s.sum !== {filled['sum']}")
    assert heat["count"] >= filled["count"]


def test_screenshot(page, example, tmp_path):
    upload(page, str(example), 1)
    wait_quality(page, example.name)  # the picture shows the score, not "scoring"
    picture = tmp_path / "serve.png"
    page.screenshot(path=str(picture))
    data = picture.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    with Image.open(picture) as image:
        assert image.size == (1280, 800)
    if os.environ.get("ESPMEDSAM_SCREENSHOT"):
        target = Path(os.environ["ESPMEDSAM_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, target)


def test_a_volume_has_a_slice_slider(page, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    yy, xx = np.mgrid[:64, :64]
    volume = np.zeros((64, 64, 5), np.uint8)
    for k in range(5):  # a disc that grows slice by slice, so that each slice looks different
        volume[..., k][(yy - 32) ** 2 + (xx - 32) ** 2 < (6 + 3 * k) ** 2] = 200
    image = nibabel.Nifti1Image(volume, np.diag([0.5, 0.5, 2.0, 1.0]))
    path = tmp_path / "disc.nii.gz"
    nibabel.save(image, path)

    page.select_option("#modality", "xray")  # nothing shown yet: the choice is for the next files
    upload(page, str(path), 1)
    assert page.is_visible("#slice-control")
    assert page.get_attribute("#slice", "max") == "5"
    assert "5 slices" in page.text_content("#result-size")
    assert "mm²" in page.text_content("#result-area")  # the NIfTI gives the spacing
    assert shown_modality(page) == "xray"

    before = page.evaluate("document.getElementById('image-canvas').toDataURL()")
    target = "1" if page.input_value("#slice") != "1" else "5"
    page.focus("#slice")
    page.keyboard.press("Home" if target == "1" else "End")
    page.wait_for_function(
        "([before]) => document.body.dataset.state === 'done'"
        " && document.getElementById('image-canvas').toDataURL() !== before",
        arg=[before],
        timeout=DONE_TIMEOUT_MS,
    )
    assert page.text_content("#slice-value") == f"{target} / 5"

    with page.expect_download() as info:
        page.click("#download-mask")
    assert info.value.suggested_filename == "disc_mask.nii.gz"
    mask = gzip.decompress(Path(info.value.path()).read_bytes())
    assert mask[344:348] == b"n+1\x00"


def test_changing_the_modality_segments_the_file_again(page, example):
    upload(page, str(example), 1)
    first = shown_modality(page)
    other = next(
        name
        for name in page.eval_on_selector_all("#modality option", "o => o.map(e => e.value)")
        if name not in ("auto", first)
    )
    page.select_option("#modality", other)
    page.wait_for_function(
        "([other]) => document.body.dataset.state === 'done'"
        " && document.getElementById('result-modality').textContent.startsWith(other)",
        arg=[other],
        timeout=DONE_TIMEOUT_MS,
    )
    assert page.is_hidden("#result-probability")  # chosen, not classified
    assert page.locator(".result-item").count() == 1


CANVAS_RECT = """c => {
    const r = c.getBoundingClientRect();
    return {x: r.x, y: r.y, w: r.width, h: r.height, cw: c.width, ch: c.height};
}"""


def _drag(page, box: tuple[int, int, int, int]) -> None:
    """Drag over the image from pixel (x0, y0) to pixel (x1, y1), through the pixels' centres."""
    rect = page.eval_on_selector("#prompt-canvas", CANVAS_RECT)

    def screen(x: int, y: int) -> tuple[float, float]:
        return rect["x"] + (x + 0.5) * rect["w"] / rect["cw"], rect["y"] + (y + 0.5) * rect["h"] / rect["ch"]

    page.mouse.move(*screen(box[0], box[1]))
    page.mouse.down()
    page.mouse.move(*screen((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), steps=3)
    page.mouse.move(*screen(box[2], box[3]))
    page.mouse.up()


def _corrections(page, count: int) -> dict:
    page.wait_for_function(
        "(n) => window.espmedsamCorrection && window.espmedsamCorrection.prompts === n"
        " && document.body.dataset.state === 'done'",
        arg=count,
        timeout=DONE_TIMEOUT_MS,
    )
    return page.evaluate("window.espmedsamCorrection")


def _downloaded_mask(page) -> bytes:
    with page.expect_download() as info:
        page.click("#download-mask")
    return Path(info.value.path()).read_bytes()


def test_a_box_and_a_click_correct_the_mask_and_undo_takes_them_back(page, example, tmp_path):
    upload(page, str(example), 1)
    free = overlay(page)
    assert page.is_visible("#prompt-control") and page.is_disabled("#undo-prompt")
    with Image.open(example) as image:
        width, height = image.size
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    _drag(page, box)
    timing = _corrections(page, 1)
    assert timing["clickToOverlayMs"] > 0
    boxed = wait_overlay(page, f"s.count !== {free['count']}")
    saved = _downloaded_mask(page)
    mask = np.asarray(Image.open(io.BytesIO(saved))) > 0
    assert boxed["count"] == mask.sum() > 0
    inside = mask[box[1] : box[3] + 1, box[0] : box[2] + 1].sum()
    assert inside >= 0.95 * mask.sum()  # a box is one object, inside it
    assert page.text_content("#result-quality").startswith("corrected with 1 prompt")

    modality = shown_modality(page)
    cli = ["predict", str(example), "--modality", modality, "--box", ",".join(map(str, box))]
    result = CliRunner().invoke(cli_app, [*cli, "--out", str(tmp_path / "box")])
    assert result.exit_code == 0, result.output
    assert saved == (tmp_path / "box" / f"{example.stem}_mask.png").read_bytes()

    page.check("input[name=prompt-tool][value='0']")  # a background click inside the box
    point = (width // 2, height // 2)
    _drag(page, (*point, *point))
    _corrections(page, 2)
    result = CliRunner().invoke(
        cli_app, [*cli, "--point", f"{point[0]},{point[1]},0", "--out", str(tmp_path / "pt")]
    )
    assert result.exit_code == 0, result.output
    assert _downloaded_mask(page) == (tmp_path / "pt" / f"{example.stem}_mask.png").read_bytes()

    page.click("#undo-prompt")
    _corrections(page, 1)
    wait_overlay(page, f"s.count === {boxed['count']}")
    page.keyboard.press("Control+z")  # undo from the keyboard too
    _corrections(page, 0)
    wait_overlay(page, f"s.count === {free['count']}")
    assert page.is_disabled("#undo-prompt") and page.is_disabled("#reset-prompts")
