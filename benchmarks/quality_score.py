"""How well the quality score (predicted Dice) ranks the true Dice, per set and pooled, from `espmedsam
evaluate` reports made with a checkpoint whose score is calibrated (``espmedsam quality calibrate``).

Usage: python benchmarks/quality_score.py REPORT_DIR ... [--review-below T] [--out FILE]

Per set: Spearman correlation of predicted with true Dice, AUROC of flagging true Dice < 0.5 by low
predicted Dice, the masks below 0.5, and how many of them the review threshold flags (and how many masks
it flags in all).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from _report import report

from espmedsam.metrics import agreement


def scored_rows(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Dataset -> (predicted Dice, true Dice) of its scored images."""
    with (folder / "per_image.csv").open() as file:
        rows = [r for r in csv.DictReader(file) if r.get("predicted_dice") not in (None, "", "nan")]
    sets: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        sets.setdefault(row["dataset"], []).append((float(row["predicted_dice"]), float(row["dice"])))
    return {name: tuple(np.array(v).T) for name, v in sets.items()}  # type: ignore[misc]


def line(name: str, predicted: np.ndarray, dice: np.ndarray, threshold: float) -> str:
    fit = agreement(predicted, dice, threshold)
    auroc = "—" if np.isnan(fit.auroc) else f"{fit.auroc:.3f}"
    rho = "—" if np.isnan(fit.spearman) else f"{fit.spearman:.3f}"
    return (
        f"| {name} | {fit.images} | {dice.mean():.3f} | {predicted.mean():.3f} | {rho} | {auroc} | "
        f"{fit.failures} | {fit.caught} | {fit.flagged} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--review-below", type=float, required=True, help="the checkpoint's threshold")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for folder in args.reports:
        sets.update(scored_rows(folder))
    lines = [
        f"review threshold {args.review_below:.3f} (the checkpoint's)",
        "",
        "| test set | images | mean Dice | mean predicted | Spearman | AUROC (Dice < 0.5) | below 0.5 "
        "| of them flagged | flagged in all |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [line(name, p, d, args.review_below) for name, (p, d) in sets.items()]
    predicted = np.concatenate([p for p, _ in sets.values()])
    dice = np.concatenate([d for _, d in sets.values()])
    lines.append(line("**pooled**", predicted, dice, args.review_below))
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
