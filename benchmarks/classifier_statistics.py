"""Give a checkpoint's classifier feature statistics of the nine datasets, as `espmedsam classifier stats`.

Usage: python benchmarks/classifier_statistics.py [--checkpoint CKPT] --write OUT.safetensors
       [--features-cache DIR] [--out FILE]

The same steps as ``espmedsam classifier stats CKPT --data data/isic2017 ... --data data/stare:fundus --fp16
--out OUT`` (``compute_statistics``: ``extract_features`` of the train splits with augmented variants and
of the val splits, then ``statistics_from_features``), with the features kept in ``--features-cache``
(``_features.py``) so a re-run skips the encoder. Reports the threshold, the val images accepted
and the checkpoint's size before and after.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _features import split_features
from _report import cpu_description, report

from espmedsam.checkpoints.native import default_checkpoint, load_model, save_model
from espmedsam.train.classifier_statistics import statistics_from_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--write", type=Path, required=True)
    parser.add_argument("--features-cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = args.checkpoint or default_checkpoint()
    model = load_model(source)
    start = time.monotonic()
    (train, _), (val, _) = (split_features(model, split, args.features_cache) for split in ("train", "val"))
    model, calibration = statistics_from_features(model, train, val, round_to=torch.float16)
    path = save_model(model, args.write, dtype=torch.float16)
    before, after = source.stat().st_size, path.stat().st_size
    counts = model.classifier.statistics_count.tolist()
    shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in calibration.accepted.items())
    lines = [
        f"`python benchmarks/classifier_statistics.py --write {args.write}"
        f"{f' --features-cache {args.features_cache}' if args.features_cache else ''}`; {cpu_description()}, "
        f"torch {torch.__version__}; {time.monotonic() - start:.0f} s (cached features excluded).",
        "",
        f"- source: `{source.name}`; the nine datasets' train splits ({len(train.labels)} embeddings: "
        + ", ".join(f"{m} {n}" for m, n in zip(model.modalities, counts, strict=True))
        + f"), rank {model.classifier.statistics_rank}, stored as float16",
        f"- unknown threshold {calibration.threshold:.3f}: the {calibration.percentile:g}th percentile of "
        f"{calibration.images} val images' distance to their closest modality; val accepted: {shares}",
        f"- checkpoint {before:,} bytes -> {after:,} bytes (+{after - before:,} bytes, "
        f"+{100 * (after - before) / before:.2f} %)",
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
