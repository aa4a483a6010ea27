"""Accuracy of the modality classifier (``--modality auto``) on test splits, with a confusion table.

Usage: python benchmarks/modality_classifier.py [--checkpoint CKPT] [--split test] [--out FILE]

Every image of the split goes through ``Predictor.classify`` (the whole image squashed to the classifier's
square input, the controller-free encoder, the head), as ``espmedsam predict`` does when the modality is
not given. The six in-domain sets are the target; the extra training-side sets are listed apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _data import EXTRA, IN_DOMAIN, split_images
from _report import report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.data.io import read_image
from espmedsam.predict import Predictor


def confusion(predictor: Predictor, files: list[tuple[Path, str]]) -> tuple[np.ndarray, list[str]]:
    """(M, M) counts (row: true, column: chosen) and the files chosen wrong."""
    names = predictor.modalities
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    wrong = []
    for path, modality in files:
        chosen = predictor.classify(read_image(path)).modality
        matrix[names.index(modality), names.index(chosen)] += 1
        if chosen != modality:
            wrong.append(f"{path.parent.parent.name}/{path.name} ({modality} → {chosen})")
    return matrix, wrong


def table(matrix: np.ndarray, names: tuple[str, ...]) -> list[str]:
    lines = [
        "| true \\ chosen | " + " | ".join(names) + " | accuracy |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for name, row in zip(names, matrix, strict=True):
        accuracy = f"{100 * row[names.index(name)] / row.sum():.1f} %" if row.sum() else "–"
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {accuracy} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_model(args.checkpoint or default_checkpoint()), device="cpu")
    names = predictor.modalities
    lines = []
    for title, sets in (("six in-domain sets", IN_DOMAIN), ("extra sets (BUS-BRA, MoNuSAC)", EXTRA)):
        matrix, wrong = confusion(predictor, split_images(sets, args.split))
        accuracy = matrix.trace() / matrix.sum()
        lines += [f"**{title}, {args.split} split: {100 * accuracy:.2f} % of {matrix.sum()} images**", ""]
        lines += table(matrix, names) + [""]
        lines += [f"wrong: {', '.join(wrong) if wrong else 'none'}", ""]
    report("\n".join(lines).rstrip(), args.out)


if __name__ == "__main__":
    main()
