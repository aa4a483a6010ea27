"""Prompts on the test splits: one box per ground-truth component, and simulated clicks that correct the
prompt-free mask, through ``Predictor.predict(image, modality, boxes=..., points=..., labels=...)``.

Usage: python benchmarks/prompt_correction.py --checkpoint CKPT [--sets isic2017,...] [--limit N]
       [--clicks 3] [--threads 2] [--out FILE]

``CKPT`` has a promptable decoder (``espmedsam import litemedsam --into``). Dice at the image's original
resolution, per set:

- **prompt-free**: ``predict(image, modality)``;
- **box per component**: the bounding box of each connected component of the ground truth, each decoded
  as one object, the masks united (as LiteMedSAM's box figures are measured);
- **clicks** (the interactive-segmentation protocol): starting from the prompt-free mask, one click at
  the centre of the largest error region (the pixel farthest from its border), foreground where the mask
  missed the object and background where it spilled over; repeated up to ``--clicks`` times, each time
  with all clicks so far, on the corrected mask. Dice after 0, 1, 2 and 3 clicks;
- **largest error set right**: the prompt-free mask with its largest error region corrected exactly, no
  model involved: what a first click gives at most if it mends only the region it lands in.

It also counts the encoder calls: one per image, however many corrections.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _report import cpu_description, report
from scipy import ndimage

from espmedsam.checkpoints.native import load_model
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.predict import Predictor
from espmedsam.train.clicks import largest_error_region, next_click

NON_VESSEL = ("isic2017", "shenzhen_montgomery", "busi", "dsb2018", "cvc_clinicdb")


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    total = mask.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (mask & truth).sum() / total)


def component_boxes(truth: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each connected component, corners inclusive."""
    labels, _ = ndimage.label(truth)
    return [(s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in ndimage.find_objects(labels)]


def evaluate_image(predictor: Predictor, image, truth, modality: str, clicks: int) -> dict[str, float]:
    free = predictor.predict(image, modality)
    row = {"free": dice(free, truth)}
    boxes = component_boxes(truth)
    boxed = predictor.predict(image, modality, boxes=boxes) if boxes else np.zeros_like(truth)
    row["box"] = dice(boxed, truth)
    region = largest_error_region(free, truth)
    row["fixed"] = row["free"] if region is None else dice(free ^ region, truth)
    mask, points, labels = free, [], []
    row["click0"] = row["free"]
    for k in range(1, clicks + 1):
        click = next_click(mask, truth)
        if click is not None:
            points.append(click[:2])
            labels.append(click[2])
            mask = predictor.predict(image, modality, points=points, labels=labels)
        row[f"click{k}"] = dice(mask, truth)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--sets", default=",".join(NON_VESSEL))
    parser.add_argument("--limit", type=int, default=None, help="first N test images per set")
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_model(args.checkpoint), device="cpu")
    columns = ["free", "box", "fixed", *(f"click{k}" for k in range(1, args.clicks + 1))]
    clicks = range(1, args.clicks + 1)
    header = [
        "prompt-free",
        "box per component",
        "largest error set right",
        *(f"{k} click{'s' * (k > 1)}" for k in clicks),
    ]
    lines = [
        f"`python benchmarks/prompt_correction.py --checkpoint {args.checkpoint.name}"
        f"{f' --limit {args.limit}' if args.limit else ''}`; {cpu_description()}, {args.threads} threads, "
        "torch bf16; Dice at the original resolution",
        "",
        "| test set | images | " + " | ".join(header) + " | gain after 1 click |",
        "|---|---:|" + "---:|" * (len(header) + 1),
    ]
    means, start = {}, time.monotonic()
    for name in args.sets.split(","):
        folder = SegmentationFolder(parse_dataset_arg(f"data/{name}"), "test")
        rows = []
        for index in range(min(len(folder), args.limit or len(folder))):
            sample = folder[index]
            truth = sample.mask > 0
            rows.append(evaluate_image(predictor, sample.image, truth, folder.modality, args.clicks))
        means[name] = {c: float(np.mean([r[c] for r in rows])) for c in columns}
        m = means[name]
        gain = m["click1"] - m["free"] if args.clicks else float("nan")
        cells = " | ".join(f"{m[c]:.3f}" for c in columns)
        lines.append(f"| {name} | {len(rows)} | {cells} | {gain:+.3f} |")
        print(lines[-1], flush=True)
    average = {c: float(np.mean([m[c] for m in means.values()])) for c in columns}
    cells = " | ".join(f"**{average[c]:.3f}**" for c in columns)
    lines.append(f"| **mean of the sets** | | {cells} | |")
    calls = predictor._prompter.encoder_calls if predictor._prompter else 0
    seconds = time.monotonic() - start
    lines += ["", f"{seconds:.0f} s; encoder calls on the prompt path: {calls} (one per image)"]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
