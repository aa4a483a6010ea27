"""Shared parts of the web-app benchmarks: ``espmedsam serve`` as its own process, and 512-px test images."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from _data import IN_DOMAIN, split_images
from PIL import Image

from espmedsam.data.io import read_image


@contextmanager
def serve_process(*options: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``espmedsam serve --port 0`` started as a user would; yields the process and its URL."""
    command = [sys.executable, "-m", "espmedsam", "serve", "--port", "0", "--log-level", "warning", *options]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        seen, deadline = "", time.monotonic() + 600  # a first OpenVINO export: minutes
        while not (found := re.search(r"http://127\.0\.0\.1:\d+", seen)):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"espmedsam serve did not start: {seen}")
            seen += server.stderr.readline()
        yield server, found.group(0)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def memory_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of process ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def images_512(folder: Path) -> list[tuple[Path, str]]:
    """The first test image of each in-domain dataset, its long side resized to 512 px, as PNG files."""
    made = []
    for name in IN_DOMAIN:
        path, modality = split_images((name,), "test")[0]
        image = read_image(path)
        scale = 512 / max(image.shape[:2])
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        out = folder / f"{name}_512.png"
        Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.BICUBIC).save(out)
        made.append((out, modality))
    return made
