"""Which feature space and rank the classifier's statistics use: in-domain acceptance against out-of-scope
images flagged, for Gaussians of the pooled, normalised (after LayerNorm) and hidden (after fc1 + GELU)
features.

Usage: python benchmarks/classifier_statistics_spaces.py [--checkpoint CKPT] [--features-cache DIR]
       [--out FILE]

For each space and rank the same recipe as ``classifier_statistics``: one probabilistic-PCA Gaussian per
modality on the nine train splits (augmented variants), each scaled by the median distance of its own
features, the threshold at the 99.5th percentile of the val images' distance to their closest modality;
then the share of the nine test splits accepted and of the counted out-of-scope images
(``_out_of_scope.py``) flagged. Features come from ``_features.py`` (the test split's in batches of 16).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _features import split_features
from _out_of_scope import COUNTED, out_of_scope_images
from _report import report

from espmedsam.checkpoints.native import default_checkpoint, load_model
from espmedsam.device import autocast
from espmedsam.models.classifier import ModalityClassifier, mahalanobis
from espmedsam.train.classifier_statistics import fit_gaussian


def space(classifier: ModalityClassifier, features: torch.Tensor, name: str) -> torch.Tensor:
    with torch.no_grad():
        if name == "pooled":
            return features
        normalised = classifier.norm(features)
        return normalised if name == "normalised" else classifier.lift(normalised)


@torch.inference_mode()
def out_of_scope_features(model) -> torch.Tensor:
    """Pooled features of the counted out-of-scope images (a multi-frame file: its middle frame)."""
    pooled = []
    for sample in out_of_scope_images():
        if sample.source in COUNTED:
            x = model.classifier_input(sample.frames[len(sample.frames) // 2])
            with autocast(torch.device("cpu"), True):
                pooled.append(ModalityClassifier.pool(model.encode(x, None)))
    return torch.cat(pooled)


def closest(gaussians, scales, x: torch.Tensor) -> torch.Tensor:
    stacked = [torch.stack([getattr(g, f) for g in gaussians]) for f in ("mean", "basis", "variance")]
    residual = torch.stack([g.residual for g in gaussians])
    return (mahalanobis(x, *stacked, residual) / scales).min(1).values


def evaluate(classifier, name: str, rank: int, train, val, test, ood) -> str:
    x = space(classifier, train.features, name)
    classes = range(int(train.labels.max()) + 1)
    gaussians = [fit_gaussian(x[train.labels == c], rank) for c in classes]
    own = [
        mahalanobis(x[train.labels == c], g.mean[None], g.basis[None], g.variance[None], g.residual[None])
        for c, g in zip(classes, gaussians, strict=True)
    ]
    scales = torch.stack([d.median() for d in own])  # each class's own median distance

    def distance(features: torch.Tensor) -> torch.Tensor:
        return closest(gaussians, scales, space(classifier, features, name))

    threshold = np.percentile(distance(val.features).numpy(), 99.5)
    accepted = float((distance(test.features) <= threshold).float().mean())
    flagged = float((distance(ood) > threshold).float().mean())
    return f"| {name} | {x.shape[1]} | {rank} | {100 * accepted:.1f} % | {100 * flagged:.1f} % |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--features-cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.checkpoint or default_checkpoint())
    train, val, test = (split_features(model, s, args.features_cache)[0] for s in ("train", "val", "test"))
    ood = out_of_scope_features(model)
    rows = [
        evaluate(model.classifier, name, rank, train, val, test, ood)
        for name in ("pooled", "normalised", "hidden")
        for rank in (8, 32, 64)
    ]
    cache = f" --features-cache {args.features_cache}" if args.features_cache else ""
    lines = [
        f"`python benchmarks/classifier_statistics_spaces.py{cache}`: {len(test.labels)} test images, "
        f"{len(ood)} counted out-of-scope images, threshold at the 99.5th val percentile.",
        "",
        "| space | size | rank | test accepted | out of scope flagged |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
