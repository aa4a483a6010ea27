"""A 100-page 512² TIFF stack through ``espmedsam predict``, beside the same frames as a NIfTI volume: wall
time and peak RSS of the whole command (model load included), each in a process of its own.

Usage: python benchmarks/predict_stack.py [--pages 100] [--side 512] [--modality xray] [--threads 2]
       [--out FILE]

The frames are ``predict_volume.py``'s synthetic volume mapped to uint8 (so both files hold the same
pixels): a multi-page TIFF (Pillow, ``save_all``) and a uint8 NIfTI. Each file is segmented with
``--modality`` (no classifier pass), writing the mask stack and the montage.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import cpu_description, report
from PIL import Image


def frames(pages: int, side: int) -> np.ndarray:
    """(pages, side, side) uint8: a bright ellipsoid in smooth noise."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:pages, :side, :side]
    ball = (
        ((x - side / 2) / (side / 4)) ** 2
        + ((y - side / 2) / (side / 5)) ** 2
        + ((z - pages / 2) / (pages / 3)) ** 2
    )
    values = rng.normal(80, 20, (pages, side, side)) + 120 * (ball < 1)
    return values.clip(0, 255).astype(np.uint8)


def write_tiff(stack: np.ndarray, path: Path) -> Path:
    pages = [Image.fromarray(page) for page in stack]
    pages[0].save(path, format="TIFF", save_all=True, append_images=pages[1:])
    return path


def write_nifti(stack: np.ndarray, path: Path) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(stack.transpose(2, 1, 0), np.eye(4)), path)
    return path


def run_predict(path: Path, out: Path, modality: str, threads: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``espmedsam predict path`` in a child process."""
    command = [sys.executable, "-m", "espmedsam", "predict", str(path), "--modality", modality,
               "--out", str(out), "--threads", str(threads)]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--modality", default="xray")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stack = frames(args.pages, args.side)
    lines = [
        f"`python benchmarks/predict_stack.py`; {cpu_description()}; {args.pages} frames of {args.side}², "
        f"uint8, `espmedsam predict FILE --modality {args.modality} --threads {args.threads}` in a process "
        "of its own (model load, read, segment, mask stack and montage written)",
        "",
        "| input | file size | seconds | frames/s | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        inputs = {
            "multi-page TIFF": write_tiff(stack, root / "stack.tif"),
            "NIfTI volume": write_nifti(stack, root / "volume.nii.gz"),
        }
        for label, path in inputs.items():
            seconds, peak = run_predict(path, root / f"out_{path.stem}", args.modality, args.threads)
            size = path.stat().st_size / 2**20
            lines.append(
                f"| {label} | {size:.1f} MB | {seconds:.1f} | {args.pages / seconds:.2f} | {peak:.0f} MB |"
            )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
