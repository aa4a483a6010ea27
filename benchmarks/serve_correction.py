"""Correction round trip in the page of ``espmedsam serve``: a box or click -> the updated overlay, in
headless Chromium.

Usage: python benchmarks/serve_correction.py [--repeats 5] [--chromium PATH] [--out FILE]

The server runs as its own process (bundled weights, all cores, bf16 autocast). For the first test image of
each in-domain set, resized to 512 px (long side), the page segments the file once (the image is embedded
then), and a box over the middle half of the image is dragged ``--repeats`` times (each time after Reset),
then as many single foreground clicks near the centre (each on another pixel: the kept masks of a
click sequence seen before would cost no decoder pass). The page measures from the pointer's release to
the moment the corrected overlay is drawn (``window.espmedsamCorrection.clickToOverlayMs``): the request, the
decoder pass(es) on the kept embedding, the PNG mask and mask file, the transfer, decoding and drawing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _report import cpu_description, report
from _server import images_512
from serve_latency import served_page, upload_and_time

CANVAS_RECT = """c => {
    const r = c.getBoundingClientRect();
    return {x: r.x, y: r.y, w: r.width, h: r.height, cw: c.width, ch: c.height};
}"""


def drag(page, box: tuple[int, int, int, int]) -> None:
    """Drag over the image from pixel (x0, y0) to (x1, y1); a click when both are the same pixel."""
    rect = page.eval_on_selector("#prompt-canvas", CANVAS_RECT)

    def screen(x: int, y: int) -> tuple[float, float]:
        return rect["x"] + (x + 0.5) * rect["w"] / rect["cw"], rect["y"] + (y + 0.5) * rect["h"] / rect["ch"]

    page.mouse.move(*screen(box[0], box[1]))
    page.mouse.down()
    page.mouse.move(*screen(box[2], box[3]))
    page.mouse.up()


def corrected(page, prompts: int) -> tuple[float, float]:
    """(release-to-overlay ms, server seconds) once the page shows the mask of ``prompts`` prompts."""
    page.wait_for_function(
        "n => window.espmedsamCorrection && window.espmedsamCorrection.prompts === n"
        " && document.body.dataset.state === 'done'",
        arg=prompts,
        timeout=120_000,
    )
    timing = page.evaluate("window.espmedsamCorrection")
    return float(timing["clickToOverlayMs"]), float(timing["serverSeconds"])


def time_prompt(page, box: tuple[int, int, int, int]) -> tuple[float, float]:
    page.evaluate("window.espmedsamCorrection = null")
    drag(page, box)
    timing = corrected(page, 1)
    page.click("#reset-prompts")
    corrected(page, 0)
    return timing


def near_centre(width: int, height: int, repeat: int) -> tuple[int, int, int, int]:
    """A click (a zero-length drag) ``3 * repeat`` pixels right of the image's centre."""
    x, y = width // 2 + 3 * repeat, height // 2
    return x, y, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chromium", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images = [(path.stem, path.read_bytes(), modality) for path, modality in images_512(Path(folder))]
    rows = []
    with served_page(args.chromium) as page:
        for stem, data, modality in images:
            upload_and_time(page, f"{stem}.png", data)
            width, height = page.eval_on_selector("#prompt-canvas", "c => [c.width, c.height]")
            box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
            page.check("input[name=prompt-tool][value='box']")
            time_prompt(page, box)  # warm-up: the first correction embeds the image for prompts
            boxes = [time_prompt(page, box) for _ in range(args.repeats)]
            page.check("input[name=prompt-tool][value='1']")
            # each click on another pixel: the server keeps the masks of click sequences it has decoded
            clicks = [time_prompt(page, near_centre(width, height, r)) for r in range(args.repeats)]
            rows.append((stem, modality, width, height, boxes, clicks))
    lines = [
        "# espmedsam serve: a box or click to the corrected overlay, 512-px images",
        "",
        f"`python benchmarks/serve_correction.py --repeats {args.repeats}`; {cpu_description()}, headless "
        "Chromium on the same machine, bundled weights, bf16 autocast; the image already embedded.",
        "",
        "| image (512 px long side) | modality | box → overlay, median (ms) | max (ms) | server (ms) "
        "| click → overlay, median (ms) | max (ms) | server (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    medians = []
    for stem, modality, _, _, boxes, clicks in rows:
        cells = []
        for timings in (boxes, clicks):
            page_ms = [ms for ms, _ in timings]
            medians.append(statistics.median(page_ms))
            server = statistics.median(1000 * s for _, s in timings)
            cells.append(f"{statistics.median(page_ms):.0f} | {max(page_ms):.0f} | {server:.0f}")
        lines.append(f"| {stem} | {modality} | {' | '.join(cells)} |")
    under = sum(m <= 300 for m in medians)
    lines += [
        "",
        f"{under} of {len(medians)} medians at or under 0.3 s; slowest median {max(medians):.0f} ms.",
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
