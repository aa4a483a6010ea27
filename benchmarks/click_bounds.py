"""What any one-click correction could gain at most, by kind of error, on the validation splits.

Usage: python benchmarks/click_bounds.py --checkpoint CKPT [--sets dsb2018,...] [--threads 2] [--out FILE]

The correction benchmark (``benchmarks/prompt_correction.py``) clicks once at the centre of the largest
error region of the prompt-free mask. Its target asks one click to raise a set's Dice by 0.04. Which
errors a click could mend decides whether that is possible, so each prompt-free mask is corrected here
with the ground truth, no model, in four ways (in model-input pixels, on the validation splits):

- **best level**: the prompt-free logits cut at the image's own best threshold (of -4..4 in steps of
  0.25) instead of 0: the most a click that moves the whole mask's level could give;
- **whole objects**: every ground-truth object the mask misses entirely added, every mask component that
  touches no ground truth removed: the most a click that brings back or removes like objects could give;
- **clicked region**: the largest error region (where the benchmark's click lands) set right;
- **all three**: best level, then whole objects, then the largest error region of that, set right.

What stays after all three is boundary error on objects the mask found: only redrawing those
boundaries (a better segmentation, not a correction) mends it. Beside them: the click decoder's Dice
after the benchmark's one click (``train.clicks.click_dice``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _report import cpu_description, report
from prompt_correction import NON_VESSEL
from scipy import ndimage

from espmedsam.checkpoints.native import load_model
from espmedsam.data.dataset import parse_dataset_arg
from espmedsam.train.clicks import ClickSampleCache, click_dice, largest_error_region, prepare_samples
from espmedsam.train.quality import dice_score

LEVELS = np.arange(-4.0, 4.01, 0.25)
COLUMNS = ("prompt-free", "best level", "whole objects", "clicked region", "all three", "1 click")


def best_level(logits: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The mask of ``logits`` cut at the threshold of ``LEVELS`` with the best Dice against ``truth``."""
    return max((logits > level for level in LEVELS), key=lambda mask: dice_score(mask, truth))


def whole_objects_right(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``mask`` with the truth's objects it misses entirely added and its components on no truth removed."""
    truth_objects, _ = ndimage.label(truth)
    missed = np.isin(truth_objects, np.unique(truth_objects[mask]), invert=True) & truth
    mask_objects, _ = ndimage.label(mask)
    spurious = np.isin(mask_objects, np.unique(mask_objects[truth]), invert=True) & mask
    return (mask | missed) & ~spurious


def clicked_region_right(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``mask`` with its largest error region set to the truth."""
    region = largest_error_region(mask, truth)
    return mask if region is None else np.where(region, truth, mask)


def bounds(logits: np.ndarray, truth: np.ndarray) -> list[float]:
    """Dice of the prompt-free mask and of its four corrections (module docstring), in ``COLUMNS``' order."""
    mask = logits > 0
    level = best_level(logits, truth)
    masks = [mask, level, whole_objects_right(mask, truth), clicked_region_right(mask, truth),
             clicked_region_right(whole_objects_right(level, truth), truth)]  # fmt: skip
    return [dice_score(m, truth) for m in masks]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--sets", default=",".join(NON_VESSEL))
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    cache = ClickSampleCache.for_model(model)
    lines = [
        f"`python benchmarks/click_bounds.py --checkpoint {args.checkpoint.name} --sets {args.sets} "
        f"--split {args.split}`; {cpu_description()}; Dice in model-input pixels",
        "",
        f"| {args.split} set | images | {COLUMNS[0]} | "
        + " | ".join(f"{c}: gain" for c in COLUMNS[1:])
        + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for name in args.sets.split(","):
        samples = prepare_samples(
            model, [parse_dataset_arg(str(args.data_root / name))], args.split, cache=cache
        )
        rows = []
        for sample, clicked in zip(samples, click_dice(model, samples, 1), strict=True):
            h, w = sample.valid
            logits = sample.logits[0, :h, :w].float().numpy()
            rows.append([*bounds(logits, sample.truth[:h, :w]), clicked[1]])
        mean = np.mean(rows, axis=0)
        gains = " | ".join(f"{v - mean[0]:+.3f}" for v in mean[1:])
        lines.append(f"| {name} | {len(rows)} | {mean[0]:.3f} | {gains} |")
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
