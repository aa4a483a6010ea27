"""Validate a dataset folder (``images/``, ``masks/``, ``split.json``) and list every problem found."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from espmedsam.data.dataset import SPLITS, find_files, read_split
from espmedsam.data.io import MASK_SUFFIXES, read_image, read_mask_values
from espmedsam.errors import DataError

logger = logging.getLogger(__name__)

Severity = Literal["error", "warning"]


class Problem(NamedTuple):
    """One finding: its severity, the stem or file it concerns, and what is wrong."""

    severity: Severity
    item: str
    message: str


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`check_dataset` found in one folder.

    Attributes:
        splits: split name -> number of stems listed in ``split.json`` (empty without one).
        pairs: number of stems with both an image and a mask file.
        problems: every finding, errors first.
    """

    root: Path
    pairs: int
    splits: dict[str, int] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")


def check_dataset(root: str | Path) -> DatasetReport:
    """Check a dataset folder: pairs, readability, sizes, binary masks and the split.

    Errors: no pair at all, an image without mask or the reverse, several files for one stem, an unreadable
    file (empty, truncated, not an image, over ``MAX_IMAGE_PIXELS``, several frames, NaN pixels), an image
    and mask of different sizes, a stem in ``split.json`` without files or in several splits, a malformed
    ``split.json``. Warnings: a mask with more than one foreground value (masks are binarised at > 0
    anyway), an empty mask, files in no split, a missing ``split.json``, a split name other than
    train/val/test, files of another type.

    Raises:
        DataError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    problems: list[Problem] = []
    images, masks = _listing(root, "images", problems), _listing(root, "masks", problems)
    problems += _pairing(images, masks)
    pairs = sorted(set(images) & set(masks))
    if not pairs and (root / "images").is_dir() and (root / "masks").is_dir():
        problems.append(Problem("error", "images/", "no image/mask pairs found"))
    for stem in pairs:
        if len(images[stem]) == 1 and len(masks[stem]) == 1:
            problems += _check_pair(stem, images[stem][0], masks[stem][0])
    splits = _check_split(root, set(images) | set(masks), problems)
    problems.sort(key=lambda p: p.severity != "error")
    report = DatasetReport(root, len(pairs), {k: len(v) for k, v in splits.items()}, tuple(problems))
    logger.info(
        "%s: %d pairs, %d errors, %d warnings", root, len(pairs), len(report.errors), len(report.warnings)
    )
    return report


def _listing(root: Path, kind: str, problems: list[Problem]) -> dict[str, list[Path]]:
    folder = root / kind
    if not folder.is_dir():
        problems.append(Problem("error", f"{kind}/", f"missing folder {folder}"))
        return {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in MASK_SUFFIXES:
            problems.append(Problem("warning", f"{kind}/{path.name}", "not an image file; ignored"))
    return find_files(folder)


def _pairing(images: dict[str, list[Path]], masks: dict[str, list[Path]]) -> list[Problem]:
    problems = [Problem("error", stem, "image without mask") for stem in sorted(set(images) - set(masks))]
    problems += [Problem("error", stem, "mask without image") for stem in sorted(set(masks) - set(images))]
    for kind, files in (("image", images), ("mask", masks)):
        for stem, paths in sorted(files.items()):
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                problems.append(Problem("error", stem, f"{len(paths)} {kind} files for one stem: {names}"))
    return problems


def _check_pair(stem: str, image_path: Path, mask_path: Path) -> list[Problem]:
    try:
        image = read_image(image_path)
    except DataError as error:
        return [Problem("error", f"images/{image_path.name}", f"unreadable ({_cause(error)})")]
    try:
        mask = read_mask_values(mask_path)
    except DataError as error:
        return [Problem("error", f"masks/{mask_path.name}", f"unreadable ({_cause(error)})")]
    if image.shape[:2] != mask.shape[:2]:
        return [Problem("error", stem, f"image is {_size(image)} but mask is {_size(mask)}")]
    problems = []
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=-1)
    values = np.unique(mask)
    if len(values[values != 0]) > 1:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        problems.append(Problem("warning", stem, f"mask not binary (values {shown}); read as > 0"))
    if values.max() <= 0:
        problems.append(Problem("warning", stem, "empty mask"))
    elif values.min() > 0:
        problems.append(Problem("warning", stem, "mask covers the whole image"))
    return problems


def _check_split(root: Path, stems: set[str], problems: list[Problem]) -> dict[str, list[str]]:
    if not (root / "split.json").is_file():
        problems.append(Problem("warning", "split.json", "no split.json; every pair is in no split"))
        return {}
    try:
        splits = read_split(root)
    except DataError as error:
        problems.append(Problem("error", "split.json", _cause(error)))
        return {}
    seen: Counter[str] = Counter()
    for name, members in splits.items():
        if name not in SPLITS:
            problems.append(
                Problem("warning", "split.json", f"split {name!r} is not one of {', '.join(SPLITS)}")
            )
        for stem, count in sorted(Counter(members).items()):
            if count > 1:
                problems.append(Problem("error", stem, f"listed {count} times in split {name!r}"))
        problems.extend(
            Problem("error", s, f"in split {name!r} but has no files") for s in members if s not in stems
        )
        seen.update(set(members))
    for stem, count in sorted(seen.items()):
        if count > 1:
            where = ", ".join(name for name, members in splits.items() if stem in members)
            problems.append(Problem("error", stem, f"in several splits ({where})"))
    problems.extend(Problem("warning", stem, "in no split") for stem in sorted(stems - set(seen)))
    return splits


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _cause(error: DataError) -> str:
    return str(error).split(": ", 1)[-1]
