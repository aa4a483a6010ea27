"""Per dataset, side by side for several `espmedsam evaluate` reports: mean, median and 10th-percentile
Dice and the images below 0.5, from each report's per_image.csv.

Usage: python benchmarks/dice_distribution.py LABEL=REPORT_DIR ... [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _report import per_image_scores, report


def per_set_dice(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.array([dice for _, dice in rows]) for name, rows in per_image_scores(folder).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="LABEL=REPORT_DIR (a folder holding per_image.csv)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    reports = [
        (label, per_set_dice(Path(folder))) for label, _, folder in (r.partition("=") for r in args.reports)
    ]
    lines = [
        "| dataset | report | n | mean | median | P10 | below 0.5 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in reports[0][1]:
        for label, sets in reports:
            if name not in sets:
                continue
            d = sets[name]
            lines.append(
                f"| {name} | {label} | {len(d)} | {d.mean():.3f} | {np.median(d):.3f} | "
                f"{np.percentile(d, 10):.3f} | {(d < 0.5).sum()} |"
            )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
