"""Unknown-modality check of ``--modality auto``: in-domain test images accepted, out-of-scope images flagged.

Usage: python benchmarks/unknown_modality.py --checkpoint CKPT [--features-cache DIR] [--out FILE]

``CKPT`` is a checkpoint whose classifier has feature statistics (``espmedsam classifier stats``). Every
image goes through ``Predictor.classify`` as ``espmedsam predict --modality auto`` does (a multi-frame
file: up to three of its slices, as ``choose_modality`` picks them). Accepted = ``known``. The in-domain
images are the test splits of the nine datasets; the out-of-scope ones are ``_out_of_scope.py``'s
(pydicom's and scikit-image's bundled samples, rendered screenshots and documents). With
``--features-cache`` the in-domain images' pooled features come from ``_features.py``'s cache (the same
encoder pass, in batches of 16) and go through the checkpoint's classifier; out-of-scope ones always go
through ``Predictor.classify``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _features import NINE, split_features, split_stems
from _out_of_scope import COUNTED, out_of_scope_images
from _report import cpu_description, report

from espmedsam.checkpoints.native import load_model
from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.predict import Predictor


def in_domain_verdicts(
    predictor: Predictor, split: str, cache: Path | None
) -> list[tuple[str, str, bool, float]]:
    """(dataset, image, known, distance) of the nine datasets' ``split``: each file through
    ``Predictor.classify``, or with ``cache``, the cached pooled features through the same classifier."""
    if cache is None:
        verdicts = []
        for item in NINE:
            folder = SegmentationFolder(parse_dataset_arg(f"data/{item}"), split)
            for index, stem in enumerate(folder.stems):
                guess = predictor.classify(folder[index].image)
                verdicts.append((folder.source.root.name, stem, guess.known, guess.distance))
        return verdicts
    found, datasets = split_features(predictor.model, split, cache)
    classifier = predictor.model.classifier
    with torch.no_grad():
        distances = classifier.unknown_distance(found.features)
    known = distances <= classifier.unknown_threshold
    names = [stem.split("/", 1)[1] for stem in split_stems(split)]
    return [(d, n, bool(k), float(v)) for d, n, k, v in zip(datasets, names, known, distances, strict=True)]


def picked(frames: np.ndarray) -> list[np.ndarray]:
    """The slices ``choose_modality`` classifies: a quarter, half and three quarters in."""
    n = len(frames)
    return [frames[i] for i in sorted({n // 4, n // 2, (3 * n) // 4})]


def acceptance(verdicts: list[tuple[str, str, bool, float]]) -> tuple[list[str], list[str]]:
    by_set: dict[str, list[bool]] = defaultdict(list)
    for dataset, _, known, _ in verdicts:
        by_set[dataset].append(known)
    rejected = [f"{d}/{n} ({v:.2f})" for d, n, known, v in verdicts if not known]
    total = [known for _, _, known, _ in verdicts]
    rows = [f"| **all nine** | {len(total)} | {sum(total)} | **{100 * np.mean(total):.1f} %** |"]
    for dataset, values in by_set.items():
        rows.append(f"| {dataset} | {len(values)} | {sum(values)} | {100 * np.mean(values):.1f} % |")
    return rows, rejected


def out_of_scope(predictor: Predictor) -> tuple[list[str], list[str], float]:
    per_source: dict[str, list[bool]] = defaultdict(list)
    detail = []
    for sample in out_of_scope_images():
        guess = predictor.classify(picked(sample.frames))
        per_source[sample.source].append(not guess.known)
        verdict = "unknown" if not guess.known else f"accepted as {guess.modality}"
        detail.append(f"| {sample.source} | {sample.name} | {guess.distance:.2f} | {verdict} |")
    rows = []
    counted = [v for s in COUNTED for v in per_source[s]]
    rows.append(f"| **counted: {', '.join(COUNTED)}** | {len(counted)} | {sum(counted)} | "
                f"**{100 * np.mean(counted):.1f} %** |")  # fmt: skip
    for source, values in per_source.items():
        rows.append(f"| {source} | {len(values)} | {sum(values)} | {100 * np.mean(values):.1f} % |")
    return rows, detail, float(np.mean(counted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--features-cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    model = load_model(args.checkpoint)
    if not model.classifier or not model.classifier.has_statistics:
        parser.error(f"{args.checkpoint} has no classifier statistics (espmedsam classifier stats)")
    predictor = Predictor(model, device="cpu")
    accepted, rejected = acceptance(in_domain_verdicts(predictor, args.split, args.features_cache))
    flagged, detail, _ = out_of_scope(predictor)
    threshold = predictor.unknown_threshold
    lines = [
        f"`python benchmarks/unknown_modality.py --checkpoint {args.checkpoint}"
        f"{f' --features-cache {args.features_cache}' if args.features_cache else ''}`; "
        f"{cpu_description()}, {args.threads} thread(s), torch {torch.__version__}, bfloat16 autocast as "
        "`espmedsam predict`; "
        f"threshold {threshold:.3f}; {time.monotonic() - start:.0f} s.",
        "",
        f"**In-domain {args.split} splits: accepted (known)**",
        "",
        "| dataset | images | accepted | share |",
        "|---|---:|---:|---:|",
        *accepted,
        "",
        f"rejected (distance): {', '.join(rejected) if rejected else 'none'}",
        "",
        "**Out of scope: flagged unknown**",
        "",
        "| source | images | flagged | share |",
        "|---|---:|---:|---:|",
        *flagged,
        "",
        "<details><summary>every out-of-scope image</summary>",
        "",
        "| source | image | distance | verdict |",
        "|---|---|---:|---|",
        *detail,
        "",
        "</details>",
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
