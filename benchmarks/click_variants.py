"""Ways of applying one click's correction, compared on the validation splits (never the test splits).

Usage: python benchmarks/click_variants.py --checkpoint CKPT [--sets isic2017,...] [--limit N]
       [--threads 1] [--out FILE]

The benchmark's first click (``benchmarks/prompt_correction.py``: the centre of the largest error
region of the prompt-free mask) goes through the click decoder, and its output is applied three ways,
in model-input pixels:

- **whole image** (what ``Predictor.predict(..., points=...)`` does): the click decoder's mask replaces
  the prompt-free one everywhere;
- **clicked region only**: only the connected region of changed pixels that holds the click is taken,
  so a click cannot change the mask away from where it was placed;
- **threshold t**: the click decoder's logits cut at t instead of 0 (a calibration of its output);
- **clicked object's box**: after a foreground click, the connected component of the click decoder's
  mask that holds the click is decoded again from its bounding box by the box decoder (LiteMedSAM's,
  as ``--refine self`` does for the prompt-free mask), and replaces the component inside the box;
  **union with it**: the box's mask is added to the click decoder's instead.

Reported: each set's Dice gain after one click over its prompt-free Dice.
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
from espmedsam.device import autocast
from espmedsam.train.clicks import ClickSample, clicks_to_tensors, next_click, prepare_samples, valid_masks
from espmedsam.train.quality import dice_score

THRESHOLDS = (-1.0, -0.5, 0.5, 1.0)
COLUMNS = ["whole", "region", *(f"t{t}" for t in THRESHOLDS), "box", "box+"]


def clicked_region_only(new: np.ndarray, old: np.ndarray, x: int, y: int) -> np.ndarray:
    """``old`` with only the connected region of changed pixels that holds (x, y) taken from ``new``."""
    regions, _ = ndimage.label(new != old)
    if not regions[y, x]:
        return old
    taken = regions == regions[y, x]
    return np.where(taken, new, old)


def with_clicked_box(model, sample: ClickSample, mask: np.ndarray, click: tuple[int, int, int], union: bool):
    """``mask`` with the component that holds a foreground click decoded again from its bounding box
    (replacing the component inside the box, or added with ``union``); unchanged for a background click
    or a click on no component."""
    x, y, label = click
    components, _ = ndimage.label(mask)
    if label != 1 or not components[y, x]:
        return mask
    own = components == components[y, x]
    rows, columns = np.nonzero(own)
    x0, y0, x1, y1 = columns.min(), rows.min(), columns.max(), rows.max()
    box = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
    with torch.inference_mode(), autocast(torch.device("cpu"), True):
        out = model.decode_prompt(sample.embedding[None].float(), sample.size, boxes=box)
    boxed = valid_masks(out.masks.float(), [sample])[0]
    inside = np.zeros_like(mask)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask | (boxed & inside) if union else np.where(inside, (mask & ~own) | boxed, mask)


def one_click_dice(model, sample: ClickSample) -> dict[str, float]:
    """Dice of the prompt-free mask and of each way of applying the first click."""
    logits = sample.logits[None].float()
    free = valid_masks(logits, [sample])[0]
    row = {"free": dice_score(free, sample.truth)}
    click = next_click(free, sample.truth)
    if click is None:
        return {key: row["free"] for key in ("free", *COLUMNS)}
    points, labels = clicks_to_tensors([[click]])
    with torch.inference_mode(), autocast(torch.device("cpu"), True):
        out = model.decode_clicks(sample.embedding[None].float(), sample.size, points, labels, logits)
    corrected = out.masks.float()
    whole = valid_masks(corrected, [sample])[0]
    row["whole"] = dice_score(whole, sample.truth)
    row["region"] = dice_score(clicked_region_only(whole, free, click[0], click[1]), sample.truth)
    for t in THRESHOLDS:
        row[f"t{t}"] = dice_score(valid_masks(corrected - t, [sample])[0], sample.truth)
    for union in (False, True):
        row[f"box{'+' if union else ''}"] = dice_score(
            with_clicked_box(model, sample, whole, click, union), sample.truth
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--sets", default=",".join(NON_VESSEL))
    parser.add_argument("--limit", type=int, default=None, help="first N validation images per set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    sources = [parse_dataset_arg(f"data/{name}") for name in args.sets.split(",")]
    samples = prepare_samples(model, sources, "val", max_per_dataset=args.limit)
    columns = COLUMNS
    header = [
        "whole image (shipped)", "clicked region only", *(f"threshold {t:+g}" for t in THRESHOLDS),
        "clicked object's box", "union with it",
    ]  # fmt: skip
    lines = [
        f"`python benchmarks/click_variants.py --checkpoint {args.checkpoint.name}`; {cpu_description()}, "
        f"{args.threads} thread(s), bf16; validation splits, model-input pixels; "
        "gain in Dice after one click",
        "",
        "| val set | images | prompt-free | " + " | ".join(header) + " |",
        "|---|---:|---:|" + "---:|" * len(header),
    ]
    for name in [s.name for s in sources]:
        rows = [one_click_dice(model, s) for s in samples if s.dataset == name]
        mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        cells = " | ".join(f"{mean[c] - mean['free']:+.4f}" for c in columns)
        lines.append(f"| {name} | {len(rows)} | {mean['free']:.4f} | {cells} |")
        print(lines[-1], flush=True)
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
