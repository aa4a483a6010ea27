"""``espmedsam predict`` spread over processes (``--num-parts``) against one process, same cores.

Usage: python benchmarks/predict_parts.py [--per-dataset N] [--cores C] [--parts P ...] [--out FILE]

The first N test images of each in-domain dataset, ``--modality auto``, masks only (no overlays). One
process with C threads, then P processes of C/P threads each (``--num-parts P --part-id K``, started
together, into one folder), then ``espmedsam predictions merge``. Wall time counts from the start of the
processes to the merged table, model loading included, as a user waits for it; the merged table must
name every input once and equal the single run's masks.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import IN_DOMAIN, split_images
from _report import report
from PIL import Image

ESPMEDSAM = [sys.executable, "-m", "espmedsam"]


def spread(files: list[Path], out: Path, parts: int, threads: int) -> float:
    common = [*ESPMEDSAM, "predict", *map(str, files), "--out", str(out), "--no-overlays"]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [*common, "--threads", str(threads), "--num-parts", str(parts), "--part-id", str(k)],
            stdout=subprocess.DEVNULL,
        )
        for k in range(parts)
    ]
    if any(p.wait() for p in processes):
        raise SystemExit(f"a part of {parts} failed")
    if parts > 1:
        subprocess.run([*ESPMEDSAM, "predictions", "merge", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rows(folder: Path) -> list[str]:
    with (folder / "predictions.csv").open(newline="") as handle:
        return [row["file"] for row in csv.DictReader(handle)]


def same_masks(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*_mask.png"))
    if names != sorted(p.name for p in b.glob("*_mask.png")):
        return False
    return all(np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-dataset", type=int, default=10)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--parts", type=int, nargs="+", default=[2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    files = [p for name in IN_DOMAIN for p, _ in split_images((name,), "test")[: args.per_dataset]]
    lines = [
        f"{len(files)} test images ({args.per_dataset} per in-domain dataset), {args.cores} cores, "
        "--modality auto, masks + predictions.csv, model loading included",
        "",
        "| processes × threads | wall (s) | images/s | × one process | rows | masks equal one process's |",
        "|---|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single"
        base = spread(files, single, 1, args.cores)
        lines.append(
            f"| 1 × {args.cores} | {base:.1f} | {len(files) / base:.2f} | 1.00× | {len(rows(single))} | — |"
        )
        for parts in args.parts:
            folder = Path(tmp) / f"parts{parts}"
            seconds = spread(files, folder, parts, max(1, args.cores // parts))
            covered = sorted(rows(folder)) == sorted(map(str, files))
            count = f"{len(rows(folder))}{'' if covered else ' (NOT every input once)'}"
            lines.append(
                f"| {parts} × {max(1, args.cores // parts)} | {seconds:.1f} | {len(files) / seconds:.2f} | "
                f"{base / seconds:.2f}× | {count} | "
                f"{'yes' if same_masks(single, folder) else 'no'} |"
            )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
