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
  **union with it**: the box's mask is added to the click decoder's instead;
- **as sure as the click**: after a foreground click, the objects of the prompt-free logits at least as
  sure as the clicked pixel (less a margin) that touch nothing are added (one missed object stands for the
  others like it); after a background click, the components no surer than the clicked pixel are removed;
- **holes filled**: after a foreground click in a hole of the prompt-free mask, every hole is filled.

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
from espmedsam.models.self_prompt import refit_clicked
from espmedsam.train.clicks import ClickSample, clicks_to_tensors, next_click, prepare_samples, valid_masks
from espmedsam.train.quality import dice_score

THRESHOLDS = (-1.0, -0.5, 0.5, 1.0)
LEVEL_MARGINS = (0.0, 1.0)
COLUMNS = [
    "whole", "region", *(f"t{t}" for t in THRESHOLDS), "box", "box+",
    *(f"level{m}" for m in LEVEL_MARGINS), "holes",
]  # fmt: skip


def clicked_region_only(new: np.ndarray, old: np.ndarray, x: int, y: int) -> np.ndarray:
    """``old`` with only the connected region of changed pixels that holds (x, y) taken from ``new``."""
    regions, _ = ndimage.label(new != old)
    if not regions[y, x]:
        return old
    taken = regions == regions[y, x]
    return np.where(taken, new, old)


def with_clicked_box(
    model, sample: ClickSample, corrected: torch.Tensor, click: tuple[int, int, int], union: bool
) -> np.ndarray:
    """The click decoder's (1, 1, S, S) ``corrected`` logits as a mask, with the component that holds a
    foreground click decoded again from its bounding box (``refit_clicked``, as the click path does on
    the modalities it was chosen for: replacing the component inside the box), or with ``union`` that
    redrawn mask added to it; unchanged for a background click or a click on no component."""
    x, y, label = click
    whole = valid_masks(corrected, [sample])[0]
    if label != 1:
        return whole
    decoder = model.box_decoder(sample.embedding[None].float(), sample.size)
    with torch.inference_mode(), autocast(torch.device("cpu"), True):
        redrawn = valid_masks(refit_clicked(corrected, sample.valid, x, y, decoder), [sample])[0]
    return whole | redrawn if union else redrawn


def with_like_objects(
    mask: np.ndarray, free_logits: np.ndarray, click: tuple[int, int, int], margin: float
) -> np.ndarray:
    """``mask`` with the objects the prompt-free logits rate as sure as the clicked pixel (less ``margin``)
    added after a foreground click, where they touch nothing in ``mask``; after a background click, the
    components of ``mask`` that are no surer than the clicked pixel (plus ``margin``) removed."""
    x, y, label = click
    level = free_logits[y, x]
    if label == 1:
        candidates, _ = ndimage.label(free_logits > level - margin)
        touching = np.unique(candidates[mask])
        return mask | ((candidates > 0) & ~np.isin(candidates, touching))
    components, count = ndimage.label(mask)
    if not count:
        return mask
    peaks = np.asarray(ndimage.maximum(free_logits, components, index=np.arange(1, count + 1)))
    dropped = np.flatnonzero(peaks <= level + margin) + 1
    return mask & ~np.isin(components, dropped)


def with_holes_filled(mask: np.ndarray, free: np.ndarray, click: tuple[int, int, int]) -> np.ndarray:
    """``mask`` with every hole filled when the click is a foreground click in a hole of ``free``."""
    x, y, label = click
    if label == 1 and not free[y, x] and ndimage.binary_fill_holes(free)[y, x]:
        return ndimage.binary_fill_holes(mask)
    return mask


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
            with_clicked_box(model, sample, corrected, click, union), sample.truth
        )
    free_logits = logits[0, 0].numpy().copy()
    h, w = sample.valid
    free_logits[h:, :] = -np.inf
    free_logits[:, w:] = -np.inf
    for m in LEVEL_MARGINS:
        row[f"level{m}"] = dice_score(with_like_objects(whole, free_logits, click, m), sample.truth)
    row["holes"] = dice_score(with_holes_filled(whole, free, click), sample.truth)
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
        "clicked object's box", "union with it", *(f"as sure as the click {m:+g}" for m in LEVEL_MARGINS),
        "holes filled",
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
