"""Hold one modality's class out of the classifier and add it back from its own train split alone.

Usage: python benchmarks/classifier_holdout.py --checkpoint CKPT [--modality NAME ...] [--out FILE]

``CKPT``'s classifier has feature statistics (``espmedsam classifier stats``). For each held-out modality:

1. ``remove_modality``: the model without it (its fc2 row and statistics gone; the encoder the classifier
   reads is shared, so the other classes' features are the same);
2. ``append_modality`` and ``extend_classifier`` with no ``--classifier-data``: the new row is fitted on
   the modality's train-split features (augmented variants) against samples of the other classes' stored
   Gaussians, as ``espmedsam add-modality`` does without old images; its statistics are fitted too.

Measured on the nine datasets' test splits (pooled features of the unchanged encoder, the heads in
float32): the classifier's accuracy and the unknown check's acceptance, original vs re-added, and whether
the other classes' logits are bitwise those of the model without the class.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _features import split_features
from _report import cpu_description, report

from espmedsam.add_modality import extend_classifier
from espmedsam.checkpoints.native import load_model
from espmedsam.data.dataset import parse_dataset_arg
from espmedsam.modality_edits import append_modality, remove_modality

DATASETS = {
    "isic2017": "dermoscopy", "shenzhen_montgomery": "xray", "busi": "ultrasound", "busbra": "ultrasound",
    "drive": "fundus", "stare": "fundus", "dsb2018": "microscopy", "monusac": "microscopy",
    "cvc_clinicdb": "colonoscopy",
}  # fmt: skip


def sources(modality: str | None = None):
    return [parse_dataset_arg(f"data/{name}:{m}") for name, m in DATASETS.items() if modality in (None, m)]


def verdicts(classifier, names, features: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Chosen modality names, acceptance (known) and logits of (N, 2C) pooled features."""
    with torch.no_grad():
        logits = classifier.head(features)
        known = classifier.unknown_distance(features) <= classifier.unknown_threshold
    return [names[i] for i in logits.argmax(1).tolist()], known, logits


def holdout(model, name: str, test: dict[str, torch.Tensor]) -> tuple[list[str], float, bool, float]:
    start = time.monotonic()
    removed = remove_modality(model, name)
    added = append_modality(removed, name)
    recall = extend_classifier(added, name, sources(name), [])
    seconds = time.monotonic() - start
    rows, same = [], True
    for dataset, features in test.items():
        truth = DATASETS[dataset]
        before, known_before, _ = verdicts(model.classifier, model.modalities, features)
        after, known_after, logits = verdicts(added.classifier, added.modalities, features)
        _, _, old_logits = verdicts(removed.classifier, removed.modalities, features)
        same &= torch.equal(logits[:, : len(removed.modalities)], old_logits)
        accuracy = [100 * sum(c == truth for c in chosen) / len(chosen) for chosen in (before, after)]
        accepted = [100 * float(k.float().mean()) for k in (known_before, known_after)]
        mark = " **(re-added)**" if truth == name else ""
        cells = [f"{dataset}{mark}", truth, str(len(features)), *(f"{v:.1f} %" for v in accuracy + accepted)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows, seconds, same, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--modality", action="append", default=None)
    parser.add_argument("--features-cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    test_start = time.monotonic()
    found, datasets = split_features(model, "test", args.features_cache)
    rows_of = np.array(datasets)
    test = {name: found.features[torch.from_numpy(rows_of == name)] for name in dict.fromkeys(datasets)}
    test_seconds = time.monotonic() - test_start
    held = args.modality or list(dict.fromkeys(DATASETS.values()))
    lines = [
        f"`python benchmarks/classifier_holdout.py --checkpoint {args.checkpoint}"
        f"{''.join(f' --modality {m}' for m in args.modality or [])}"
        f"{f' --features-cache {args.features_cache}' if args.features_cache else ''}`; {cpu_description()}, "
        f"{args.threads} thread(s), torch {torch.__version__}; test features {test_seconds:.0f} s.",
        "",
    ]
    for name in held:
        rows, seconds, same, recall = holdout(model, name, test)
        lines += [
            f"**{name} held out and re-added from its train split alone** ({seconds:.0f} s; recall on its "
            f"training features {100 * recall:.1f} %; the other classes' logits bitwise those of the model "
            f"without it: {'yes' if same else 'NO'})",
            "",
            "| test set | modality | images | accuracy, original | accuracy, re-added | accepted, original "
            "| accepted, re-added |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    report("\n".join(lines).rstrip(), args.out)


if __name__ == "__main__":
    main()
