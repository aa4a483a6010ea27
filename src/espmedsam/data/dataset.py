"""Folder datasets: ``<root>/images/<stem>.*``, ``<root>/masks/<stem>.*`` and ``split.json`` -> samples.

The layout is described in ``shared/data/README.md``; ``espmedsam data check`` validates a folder and
``espmedsam data import`` converts the public layouts into it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from espmedsam.data.io import IMAGE_SUFFIXES, MASK_SUFFIXES, read_image, read_json_object, read_mask
from espmedsam.errors import DataError, InputError
from espmedsam.modalities import MODALITIES, check_modality_name, modality_ids

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")

KNOWN_DATASETS: dict[str, str] = {
    "isic2017": "dermoscopy",
    "shenzhen_montgomery": "xray",
    "busi": "ultrasound",
    "drive": "fundus",
    "dsb2018": "microscopy",
    "cvc_clinicdb": "colonoscopy",
    "busbra": "ultrasound",
    "monusac": "microscopy",
}


@dataclass(frozen=True)
class DatasetSource:
    """A dataset folder with its modality name (one of ``espmedsam.modalities.MODALITIES``)."""

    root: Path
    modality: str
    name: str


@dataclass(frozen=True, eq=False)
class Sample:
    """One image/mask pair (read-only arrays, shared with the folder's cache).

    Attributes:
        image: (H, W, 3) uint8 RGB (gray repeated, alpha dropped).
        mask: (H, W) bool foreground.
    """

    image: np.ndarray
    mask: np.ndarray
    modality: str
    dataset: str
    stem: str


def parse_dataset_arg(text: str, default_modality: str | None = None) -> DatasetSource:
    """Parse ``DIR[:MODALITY]`` into a :class:`DatasetSource`.

    Without ``:MODALITY`` the modality is ``default_modality`` when given, else from
    :data:`KNOWN_DATASETS` (by folder name), else from a ``dataset.json`` ``{"modality": ...}`` in the folder.

    Raises:
        InputError: an unknown modality name.
        DataError: a missing folder, or no way to tell the modality.
    """
    path_text, _, modality = text.rpartition(":")
    if not path_text or not modality or "/" in modality or "\\" in modality:
        path_text, modality = text, ""
    root = Path(path_text)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    modality = modality or default_modality or ""
    if modality:
        try:
            name = _modality_name(modality)
        except InputError as error:
            raise InputError(f"{text}: {error}") from None
        return DatasetSource(root=root, modality=name, name=root.name)
    return DatasetSource(root=root, modality=_infer_modality(root), name=root.name)


def _modality_name(text: str) -> str:
    """One of the six by name or id, or the name of a modality added to a model (``add-modality``)."""
    text = text.strip()
    try:
        return MODALITIES[int(modality_ids(text)[0])]
    except InputError:
        return check_modality_name(text)


def _infer_modality(root: Path) -> str:
    name = root.resolve().name
    if name in KNOWN_DATASETS:
        return KNOWN_DATASETS[name]
    info = root / "dataset.json"
    if info.is_file():
        modality = read_json_object(info).get("modality")
        if modality:
            try:
                return _modality_name(str(modality))
            except InputError as error:
                raise DataError(f"{info}: {error}") from None
    raise DataError(
        f"{root}: unknown modality; write {root}:MODALITY with MODALITY one of {', '.join(MODALITIES)}"
    )


def find_files(folder: Path, suffixes: tuple[str, ...] = MASK_SUFFIXES) -> dict[str, list[Path]]:
    """Stem -> files with that stem and a readable suffix in ``folder`` (hidden files skipped)."""
    files: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes:
                files.setdefault(path.stem, []).append(path)
    return files


def read_split(root: Path) -> dict[str, list[str]]:
    """Read ``root/split.json`` as split name -> stems.

    Raises:
        DataError: a missing or malformed file.
    """
    path = root / "split.json"
    if not path.is_file():
        raise DataError(f"{path}: no split.json; pass no split to use every pair")
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(split, dict) or not all(
        isinstance(stems, list) and all(isinstance(s, str) for s in stems) for stems in split.values()
    ):
        raise DataError(f"{path}: expected {{split name: [stems]}}")
    return split


class SegmentationFolder(Dataset):
    """A torch ``Dataset`` of :class:`Sample` from one folder, in split order (or sorted stems).

    Args:
        source: the folder and its modality (see :func:`parse_dataset_arg`).
        split: a key of ``split.json`` ("train", "val", "test"); None = every image found.
        cache: keep decoded arrays in memory after the first read.
    Raises:
        DataError: a missing folder, a missing ``split.json`` or unknown split, a stem without a single
            image or mask file.
    """

    def __init__(self, source: DatasetSource, split: str | None = None, *, cache: bool = False) -> None:
        self.source = source
        self.split = split
        images_dir, masks_dir = source.root / "images", source.root / "masks"
        for folder in (source.root, images_dir, masks_dir):
            if not folder.is_dir():
                raise DataError(f"{folder}: dataset folder not found")
        images, masks = find_files(images_dir, IMAGE_SUFFIXES), find_files(masks_dir)
        self.stems: tuple[str, ...] = tuple(self._select(split, images))
        self._pairs = [
            (self._one(images, stem, "image"), self._one(masks, stem, "mask")) for stem in self.stems
        ]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def _select(self, split: str | None, images: dict[str, list[Path]]) -> list[str]:
        if split is None:
            return sorted(images)
        splits = read_split(self.source.root)
        if split not in splits:
            raise DataError(
                f"{self.source.root / 'split.json'}: unknown split {split!r}; has {', '.join(splits)}"
            )
        return splits[split]

    def _one(self, files: dict[str, list[Path]], stem: str, kind: str) -> Path:
        found = files.get(stem, [])
        if len(found) != 1:
            problem = "no" if not found else f"{len(found)} files for the"
            raise DataError(f"{self.source.root / (kind + 's')}: {problem} {kind} of stem {stem!r}")
        return found[0]

    @property
    def modality(self) -> str:
        return self.source.modality

    @property
    def name(self) -> str:
        return self.source.name

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Sample:
        if self._cache is not None and index in self._cache:
            image, mask = self._cache[index]
        else:
            image, mask = self._load(index)
            if self._cache is not None:
                self._cache[index] = (image, mask)
        return Sample(image, mask, self.source.modality, self.source.name, self.stems[index])

    def release_cache(self) -> None:
        """Forget the decoded arrays kept so far (a later read decodes and keeps them again)."""
        if self._cache is not None:
            self._cache.clear()

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self._pairs[index]
        image, mask = to_rgb(read_image(image_path)), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        image.setflags(write=False)
        mask.setflags(write=False)
        return image, mask


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8 (gray repeated, alpha dropped)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., :3])
