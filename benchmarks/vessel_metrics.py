"""Thin structures: Dice, clDice and thin-vessel recall of a checkpoint on vessel test splits.

Usage: python benchmarks/vessel_metrics.py CKPT [CKPT ...] [--data data/drive --data data/stare]
       [--split test] [--out benchmarks/results/vessel_metrics.md]

Masks at the original resolution, as ``espmedsam evaluate`` scores them (bf16 autocast). clDice (Shit et
al., CVPR 2021) compares skeletons; thin-vessel recall is the share of the true skeleton where the vessel
is at most 3 px wide that the prediction covers (``espmedsam.metrics``). Needs scikit-image.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from _report import cpu_description, report

from espmedsam import Predictor, load_model
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.metrics import cldice, dice, thin_recall


def scores(predictor: Predictor, folder: SegmentationFolder) -> dict[str, float]:
    rows = []
    for sample in folder:
        predicted = predictor.predict(sample.image, folder.modality)
        truth = sample.mask > 0
        rows.append((dice(predicted, truth), cldice(predicted, truth), thin_recall(predicted, truth)))
    values = np.array(rows, dtype=np.float64)
    means = [float(np.nanmean(column)) for column in values.T]
    return dict(zip(("dice", "cldice", "thin_recall"), means, strict=True)) | {"n": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--data", action="append", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = args.data or ["data/drive:fundus", "data/stare:fundus"]
    lines = [
        f"torch {torch.__version__}, {cpu_description()}; split {args.split}, original resolution",
        "",
        "| checkpoint | dataset | n | Dice | clDice | thin-vessel recall (≤ 3 px) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for path in args.checkpoints:
        predictor = Predictor(load_model(path))
        for item in data:
            folder = SegmentationFolder(parse_dataset_arg(item), args.split)
            s = scores(predictor, folder)
            recall = "-" if math.isnan(s["thin_recall"]) else f"{s['thin_recall']:.3f}"
            lines.append(
                f"| {path.name} | {folder.name} | {s['n']} | {s['dice']:.3f} | {s['cldice']:.3f} | {recall} |"
            )
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
