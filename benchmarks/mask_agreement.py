"""How closely one checkpoint's masks follow another's, image by image: the Dice between the two masks.

A copy meant to replace a model (a pruned student) keeps that model's accuracy on every test set only if
it keeps its masks: a few images where the two part ways (a lesion found by one and missed by the other)
move a small set's mean Dice by more than the many border differences do. This counts such images on any
split, so a candidate can be judged on validation (or training) images without asking the test splits.

Usage: python benchmarks/mask_agreement.py --reference bundled --candidate CKPT [--split val]
       [--data busi --data busbra ...] [--below 0.8] [--worst 8] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _data import EXTRA, IN_DOMAIN
from _report import report

from espmedsam.checkpoints.native import load_model
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.metrics import dice
from espmedsam.predict import Predictor
from espmedsam.train.loop import resolve_init


def agreement_rows(
    reference: Predictor, candidate: Predictor, folders: list[SegmentationFolder]
) -> list[dict]:
    """Per image: the two masks' Dice with each other and each one's Dice with the label."""
    rows = []
    for folder in folders:
        for sample in folder:
            ours = candidate.predict(sample.image, sample.modality)
            theirs = reference.predict(sample.image, sample.modality)
            rows.append(
                {
                    "set": folder.name,
                    "image": sample.stem,
                    "agreement": dice(ours, theirs),
                    "reference": dice(theirs, sample.mask),
                    "candidate": dice(ours, sample.mask),
                }
            )
    return rows


def summary_table(rows: list[dict], below: float) -> str:
    lines = [
        f"| dataset | n | mean agreement | lowest | images below {below:g} | candidate − reference Dice |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(row["set"] for row in rows):
        own = [row for row in rows if row["set"] == name]
        agreement = np.array([row["agreement"] for row in own])
        gap = np.mean([row["candidate"] - row["reference"] for row in own])
        lines.append(
            f"| {name} | {len(own)} | {agreement.mean():.4f} | {agreement.min():.3f} | "
            f"{(agreement < below).sum()} | {gap:+.4f} |"
        )
    total = np.array([row["agreement"] for row in rows])
    lines.append(
        f"| **all** | {len(rows)} | {total.mean():.4f} | {total.min():.3f} | {(total < below).sum()} | |"
    )
    return "\n".join(lines)


def worst_table(rows: list[dict], count: int) -> str:
    lines = ["| dataset | image | agreement | reference Dice | candidate Dice |", "|---|---|---:|---:|---:|"]
    for row in sorted(rows, key=lambda row: row["agreement"])[:count]:
        lines.append(
            f"| {row['set']} | {row['image']} | {row['agreement']:.3f} | {row['reference']:.3f} | "
            f"{row['candidate']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="bundled", help="checkpoint path, or bundled")
    parser.add_argument("--candidate", required=True, help="checkpoint path, or bundled")
    parser.add_argument(
        "--data",
        action="append",
        default=None,
        help="NAME[:MODALITY] of a folder under data/ (default: the nine)",
    )
    parser.add_argument("--split", default="val")
    parser.add_argument("--below", type=float, default=0.8, help="agreement under which an image counts")
    parser.add_argument("--worst", type=int, default=8, help="list this many least agreeing images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictors = [
        Predictor(load_model(resolve_init(name)), device="cpu") for name in (args.reference, args.candidate)
    ]
    names = args.data or [*IN_DOMAIN, *EXTRA, "stare:fundus"]
    folders = [SegmentationFolder(parse_dataset_arg(f"data/{name}"), args.split) for name in names]
    rows = agreement_rows(*predictors, folders)
    title = f"{args.candidate} against {args.reference}, {args.split} split, bf16"
    report(f"{title}\n\n{summary_table(rows, args.below)}\n\n{worst_table(rows, args.worst)}", args.out)


if __name__ == "__main__":
    main()
