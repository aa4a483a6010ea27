"""Latency from upload to overlay in the page of ``espmedsam serve``, measured in headless Chromium.

Usage: python benchmarks/serve_latency.py [--repeats 5] [--backend torch|openvino] [--chromium PATH]
    [--out FILE]

The server runs as its own process (bundled weights, all cores, bf16 autocast; ``--backend openvino``:
its image encoder compiled by OpenVINO). For the first test image of
each in-domain set, resized to 512 px (long side), the page is given the file ``--repeats`` times (after one
warm-up; the six images in turn) with modality auto; the page measures from the file input's change event
to the moment the overlay is drawn on its canvas (``window.espmedsamTiming.uploadToOverlayMs``): upload,
classifier, segmentation, patch map, encoding, transfer, decoding and drawing. The quality score follows
the overlay (the page asks ``/api/quality`` for it once the mask is drawn); the time to its arrival is
reported beside.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _report import cpu_description, report
from _server import images_512, serve_process


def chromium_path(given: str | None) -> str:
    found = given or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("no chromium found: apt-get install chromium, or pass --chromium PATH")
    return found


def upload_and_time(page, name: str, data: bytes) -> tuple[float, float, float]:
    """(upload-to-overlay ms, server seconds, upload-to-quality-score ms) of one upload through the file
    input (the page draws the overlay first, then asks for the score)."""
    page.evaluate("window.espmedsamTiming = null; window.espmedsamQuality = null")
    page.set_input_files("#file-input", {"name": name, "mimeType": "image/png", "buffer": data})
    for timing in ("espmedsamTiming", "espmedsamQuality"):
        page.wait_for_function(
            f"name => window.{timing} && window.{timing}.file === name", arg=name, timeout=120_000
        )
    timing = page.evaluate("window.espmedsamTiming")
    quality = page.evaluate("window.espmedsamQuality")
    return float(timing["uploadToOverlayMs"]), float(timing["serverSeconds"]), quality["uploadToQualityMs"]


@contextmanager
def served_page(chromium: str | None, backend: str = "torch") -> Iterator:
    """A headless Chromium tab on the page of an ``espmedsam serve`` process, once its model info loaded."""
    from playwright.sync_api import sync_playwright

    with serve_process("--backend", backend) as (_, url), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(chromium), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_selector("#modality option >> nth=1", state="attached")
        yield page
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=("torch", "openvino"), default="torch")
    parser.add_argument("--chromium", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images = [(path.stem, path.read_bytes(), modality) for path, modality in images_512(Path(folder))]
    rows = []
    with served_page(args.chromium, args.backend) as page:
        for stem, data, _ in images:
            upload_and_time(page, f"{stem}_warm.png", data)
        # the images in turn, so that none follows itself: the server keeps the last image's embedding
        # (for its quality score and corrections), and the same pixels again would not run the encoder
        timings: dict[str, list[tuple[float, float, float]]] = {stem: [] for stem, _, _ in images}
        shown = {}
        for k in range(args.repeats):
            for stem, data, _ in images:
                timings[stem].append(upload_and_time(page, f"{stem}_{k}.png", data))
                shown[stem] = page.inner_text("#result-modality")
    for stem, _, modality in images:
        browser_ms = [ms for ms, _, _ in timings[stem]]
        server_ms = [1000 * s for _, s, _ in timings[stem]]
        quality_ms = statistics.median(q for _, _, q in timings[stem])
        median, worst = statistics.median(browser_ms), max(browser_ms)
        rows.append((stem, modality, shown[stem], median, worst, server_ms, quality_ms))
    lines = [
        "# espmedsam serve: upload to overlay in the page, 512-px images",
        "",
        f"`python benchmarks/serve_latency.py --repeats {args.repeats} --backend {args.backend}`; "
        f"{cpu_description()}, headless Chromium on the same machine, bundled weights, bf16, modality auto "
        "(classifier).",
        "",
        "| image (512 px long side) | modality | shown as | upload → overlay, median (ms) | max (ms) "
        "| server part, median (ms) | upload → quality score, median (ms) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for stem, modality, shown, median, worst, server_ms, quality_ms in rows:
        server = statistics.median(server_ms)
        cells = (stem, modality, shown, f"{median:.0f}", f"{worst:.0f}", f"{server:.0f}", f"{quality_ms:.0f}")
        lines.append(f"| {' | '.join(cells)} |")
    under = sum(row[3] <= 1000 for row in rows)
    lines += ["", f"{under} of {len(rows)} modalities have a median at or under 1 s."]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
