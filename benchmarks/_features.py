"""Pooled classifier features of the nine datasets' splits, as ``espmedsam classifier stats`` extracts them,
optionally kept in a cache folder (``<split>.pt``: features, labels, dataset of each row) so that the
benchmarks that read them pay for the encoder once."""

from __future__ import annotations

from pathlib import Path

import torch

from espmedsam.data.dataset import SegmentationFolder, parse_dataset_arg
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.train.classifier import FeatureSet, extract_features, variants_per_image

# the order of the --data arguments of ``classifier stats`` (the augmentation seeds follow it)
NINE = ("isic2017", "shenzhen_montgomery", "busi", "drive", "dsb2018", "cvc_clinicdb", "busbra", "monusac",
        "stare:fundus")  # fmt: skip


def split_features(model: ESPMedSAM, split: str, cache: Path | None = None) -> tuple[FeatureSet, list[str]]:
    """The split's features (train: augmented variants, 600 per modality; others: the images as they
    are) and each row's dataset name."""
    path = cache / f"{split}.pt" if cache else None
    if path and path.is_file():
        stored = torch.load(path)
        return FeatureSet(stored["features"], stored["labels"]), list(stored["dataset"])
    sources = [parse_dataset_arg(f"data/{item}") for item in NINE]
    folders = [SegmentationFolder(s, split, cache=split == "train") for s in sources]
    variants: dict[str, int] = {m: 1 for m in model.config.modalities}
    if split == "train":
        counts = {m: sum(len(f) for f in folders if f.modality == m) for m in model.config.modalities}
        variants = variants_per_image(counts, 600, 40)
    found = extract_features(model, folders, variants, seed=0)
    datasets = [f.source.root.name for f in folders for _ in range(len(f) * variants[f.modality])]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": found.features, "labels": found.labels, "dataset": datasets}, path)
    return found, datasets


def split_stems(split: str) -> list[str]:
    """``dataset/stem`` of each image of a (non-train) split, in the rows' order of ``split_features``."""
    sources = [parse_dataset_arg(f"data/{item}") for item in NINE]
    return [f"{s.root.name}/{stem}" for s in sources for stem in SegmentationFolder(s, split).stems]
