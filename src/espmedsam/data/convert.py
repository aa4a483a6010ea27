"""Converters from the layouts public datasets ship in to ours (``images/``, ``masks/``, ``split.json``).

One finder per format turns a source tree into :class:`Case` records; :func:`convert_dataset` reads each
case, merges its masks (OR), optionally shrinks it, writes the folder under a temporary name and renames it.
Official splits are kept where the layout has one; otherwise a seeded 70/10/20 random split is drawn.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from espmedsam.data.io import IMAGE_SUFFIXES, read_image, read_json_object, read_mask, write_png
from espmedsam.errors import DataError, InputError, OutputError
from espmedsam.files import atomic_write, check_output_folder, make_folder, write_text

logger = logging.getLogger(__name__)

RANDOM_SPLIT = (0.7, 0.1, 0.2)
VAL_FROM_TRAIN = 0.1
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    """One image with its mask files (merged by OR), official split (None = random) and group (BUSI class)."""

    stem: str
    image: Path
    masks: tuple[Path, ...]
    split: str | None = None
    group: str | None = None
    threshold: int = 0


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_dataset` wrote: the folder, split counts, and the items skipped (with reasons)."""

    root: Path
    format: str
    splits: dict[str, int]
    skipped: tuple[str, ...]


Finder = Callable[[Path, list[str]], list[Case]]


@dataclass(frozen=True)
class _Layout:
    find: Finder
    modality: str | None
    expected: str
    citation: str


def convert_dataset(
    fmt: str,
    src: str | Path,
    dst: str | Path,
    *,
    max_side: int | None = None,
    seed: int = 0,
    skip_normal: bool = False,
) -> ConversionReport:
    """Convert a public dataset tree ``src`` of layout ``fmt`` (a key of :data:`FORMATS`) into ``dst``.

    Args:
        max_side: shrink pairs whose longer side exceeds it (image Lanczos, mask nearest).
        seed: seed of the random split (and of the val subset taken from an official train split).
        skip_normal: BUSI only: leave out the "normal" class (no lesion, empty masks).
    Raises:
        InputError: an unknown format or a ``max_side`` below 1.
        DataError: a missing source, a non-empty ``dst``, no case found, duplicate stems, unreadable files.
        OutputError: ``dst`` is a file or cannot be created, or writing fails.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if max_side is not None and max_side < 1:
        raise InputError(f"--max-side must be positive, got {max_side}")
    layout, src, dst = FORMATS[fmt], Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst}: not a folder (a file of that name exists)")
    if dst.exists() and any(dst.iterdir()):
        raise DataError(f"{dst}: output folder exists and is not empty")
    check_output_folder(dst, "output folder")
    skipped: list[str] = []
    cases = [c for c in layout.find(src, skipped) if not (skip_normal and c.group == "normal")]
    if not cases:
        raise DataError(f"{src}: no {fmt} cases found; expected {layout.expected}")
    _check_unique(cases, src)
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = [case for case in cases if _write_case(case, tmp, max_side, skipped)]
        splits = assign_splits([(c.stem, c.split) for c in written], seed)
        _write_metadata(tmp, dst.name, fmt, src, splits, skipped, max_side, seed)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OutputError):  # named where the file was going, not by the folder now gone
            raise OutputError(str(error).replace(str(tmp), str(dst))) from error
        raise
    if skipped:
        logger.warning("%s: skipped %d items (see SOURCE.md)", src, len(skipped))
    return ConversionReport(dst, fmt, {k: len(v) for k, v in splits.items()}, tuple(skipped))


def assign_splits(stems: list[tuple[str, str | None]], seed: int) -> dict[str, list[str]]:
    """Stems with their official split (None = none) -> ``{"train", "val", "test"}`` lists of sorted stems.

    Official splits are kept; without an official val split, 10 % of an official train split becomes val.
    Stems without an official split get a seeded 70/10/20 random split.
    """
    rng = random.Random(seed)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for stem, split in stems:
        if split is not None:
            splits[split].append(stem)
    if splits["train"] and not splits["val"] and len(splits["train"]) > 1:
        train = sorted(splits["train"])
        rng.shuffle(train)
        n_val = max(1, round(VAL_FROM_TRAIN * len(train)))
        splits["val"], splits["train"] = train[:n_val], train[n_val:]
    free = sorted(stem for stem, split in stems if split is None)
    rng.shuffle(free)
    n_train, n_val = round(RANDOM_SPLIT[0] * len(free)), round(RANDOM_SPLIT[1] * len(free))
    splits["train"] += free[:n_train]
    splits["val"] += free[n_train : n_train + n_val]
    splits["test"] += free[n_train + n_val :]
    return {name: sorted(members) for name, members in splits.items()}


def _check_unique(cases: list[Case], src: Path) -> None:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.stem in seen:
            raise DataError(f"{src}: two cases named {case.stem!r} ({seen[case.stem]} and {case.image})")
        seen[case.stem] = case.image


def _write_case(case: Case, out: Path, max_side: int | None, skipped: list[str]) -> bool:
    """Write one pair; False (and a note in ``skipped``) when a file is unreadable or no mask fits."""
    try:
        image = read_image(case.image)
        masks = [(path, read_mask(path, threshold=case.threshold)) for path in case.masks]
    except DataError as error:
        skipped.append(str(error))
        return False
    if image.ndim == 3 and image.shape[2] == 4:
        image = np.ascontiguousarray(image[..., :3])
    for path, mask in masks:
        if mask.shape != image.shape[:2]:
            skipped.append(f"{path}: mask is {_size(mask)} but its image is {_size(image)}")
    masks = [mask for _, mask in masks if mask.shape == image.shape[:2]]
    if not masks:
        return False
    mask = np.logical_or.reduce(masks)
    resized = max_side is not None and max(mask.shape) > max_side
    if resized:
        image, mask = _shrink(image, mask, max_side)
    if case.image.suffix.lower() in (".jpg", ".jpeg") and not resized:
        data = case.image.read_bytes()  # copied as is: no second JPEG compression
        atomic_write(out / "images" / f"{case.stem}.jpg", lambda file: file.write(data))
    else:
        write_png(out / "images" / f"{case.stem}.png", image)
    write_png(out / "masks" / f"{case.stem}.png", mask.astype(np.uint8) * 255)
    return True


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _shrink(image: np.ndarray, mask: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    h, w = mask.shape
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    small_mask = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    )
    return small, small_mask > 0


def _write_metadata(
    out: Path,
    name: str,
    fmt: str,
    src: Path,
    splits: dict[str, list[str]],
    skipped: list[str],
    max_side: int | None,
    seed: int,
) -> None:
    from espmedsam import __version__

    layout = FORMATS[fmt]
    make_folder(out)
    write_text(out / "split.json", json.dumps(splits, indent=1) + "\n")
    info = {"name": name, "format": fmt, "source": str(src)}
    if layout.modality:
        info["modality"] = layout.modality
    write_text(out / "dataset.json", json.dumps(info, indent=1) + "\n")
    counts = " / ".join(f"{name} {len(members)}" for name, members in splits.items())
    lines = [
        f"# {info['name']} (converted from the {fmt} layout)",
        "",
        f"- **Source**: `{src.resolve()}` ({layout.expected})",
        f"- **Citation**: {layout.citation}",
        f"- **Converted by**: espmedsam {__version__}, `espmedsam data import --format {fmt}` (seed {seed})",
        "- **Changes**: images kept as JPEG when unchanged, else PNG; RGBA -> RGB; 16-bit/float rescaled to "
        f"8-bit by min/max; masks binarised at > {127 if fmt == 'kvasir' else 0}, all masks of an image "
        "merged (OR) and stored as 0/255 PNG"
        + (f"; longer side shrunk to <= {max_side} px (image Lanczos, mask nearest)" if max_side else ""),
        f"- **Split**: {counts} ({_split_note(fmt)}, seed {seed})",
        f"- **Skipped**: {len(skipped)} items" + ("" if not skipped else ":"),
        *[f"  - {item}" for item in skipped[:50]],
        *([f"  - ... and {len(skipped) - 50} more"] if len(skipped) > 50 else []),
    ]
    write_text(out / "SOURCE.md", "\n".join(lines) + "\n")


def _split_note(fmt: str) -> str:
    if fmt in ("isic", "drive"):
        return "official split; val taken from train where the layout has none"
    if fmt == "nnunet":
        return "imagesTr/imagesTs when labelsTs exists, else random 70/10/20"
    return "no official split: random 70/10/20"


def _files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _base(src: Path, *children: str) -> Path:
    """``src`` if it holds ``children``, else its single subfolder that does (archives add one level)."""
    if all((src / c).exists() for c in children):
        return src
    inner = [d for d in sorted(src.iterdir()) if d.is_dir() and all((d / c).exists() for c in children)]
    return inner[0] if inner else src


# --- nnU-Net raw: imagesTr/<case>_0000.png, labelsTr/<case>.png, optional imagesTs/labelsTs, dataset.json


def _nnunet(src: Path, skipped: list[str]) -> list[Case]:
    ending = _nnunet_ending(src)
    if ending.lower() in _VOLUME_SUFFIXES:
        raise DataError(
            f"{src}: nnU-Net dataset of {ending} volumes; 2D natural-image files (PNG, TIFF, BMP, JPEG) "
            "are needed"
        )
    if ending.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{src}: unsupported nnU-Net file_ending {ending!r}; expected PNG, TIFF, BMP or JPEG")
    has_test_labels = (src / "labelsTs").is_dir()
    cases = _nnunet_folder(
        src / "imagesTr", src / "labelsTr", ending, "train" if has_test_labels else None, skipped
    )
    if has_test_labels:
        cases += _nnunet_folder(src / "imagesTs", src / "labelsTs", ending, "test", skipped)
    elif (src / "imagesTs").is_dir():
        skipped.append(f"{src / 'imagesTs'}: no labelsTs, test images left out")
    return cases


def _nnunet_ending(src: Path) -> str:
    info = src / "dataset.json"
    if info.is_file():
        ending = read_json_object(info).get("file_ending")
        if ending:
            return str(ending)
    for path in sorted((src / "imagesTr").glob("*_0000.*")):
        return path.name[len(path.name.split(".")[0]) :]
    return ".png"


def _nnunet_folder(
    images: Path, labels: Path, ending: str, split: str | None, skipped: list[str]
) -> list[Case]:
    cases = []
    for path in sorted(images.glob(f"*_0000{ending}")):
        case = path.name[: -len(f"_0000{ending}")]
        label = labels / f"{case}{ending}"
        if label.is_file():
            cases.append(Case(case, path, (label,), split))
        else:
            skipped.append(f"{path}: no label {label.name}")
    if any(images.glob(f"*_0001{ending}")):
        skipped.append(f"{images}: extra channels (_0001, ...) left out; only _0000 is converted")
    return cases


# --- ISIC challenge: ISIC-2017_Training_Data/ISIC_x.jpg + ISIC-2017_Training_Part1_GroundTruth/
#     ISIC_x_segmentation.png (2018: ISIC2018_Task1-2_Training_Input + ISIC2018_Task1_Training_GroundTruth);
#     Validation and Test alike

_ISIC_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _isic(src: Path, skipped: list[str]) -> list[Case]:
    folders = [d for d in sorted(src.rglob("*")) if d.is_dir()]
    cases = []
    for word, split in _ISIC_SPLITS.items():
        names = [(d, d.name.lower()) for d in folders if word in d.name.lower()]
        image_dirs = [d for d, n in names if ("_data" in n or "_input" in n) and "task3" not in n]
        truth = {
            p.stem.lower().removesuffix("_segmentation"): p
            for d, n in names
            if "groundtruth" in n and ("part1" in n or "task1" in n)
            for p in _files(d)
        }
        for path in (p for d in image_dirs for p in _files(d) if "_superpixels" not in p.stem):
            if path.stem.lower() in truth:
                cases.append(Case(path.stem, path, (truth[path.stem.lower()],), split))
            else:
                skipped.append(f"{path}: no ground truth")
    return cases


# --- Kvasir-SEG: images/<id>.jpg, masks/<id>.jpg (JPEG masks, binarised at > 127)


def _kvasir(src: Path, skipped: list[str]) -> list[Case]:
    base = _base(src, "images", "masks")
    masks = {p.stem: p for p in _files(base / "masks")}
    cases = []
    for path in _files(base / "images"):
        if path.stem in masks:
            cases.append(Case(path.stem, path, (masks[path.stem],), threshold=127))
        else:
            skipped.append(f"{path}: no mask")
    return cases


# --- DRIVE: training/images/21_training.tif + training/1st_manual/21_manual1.gif; test/ alike (01_test)


def _drive(src: Path, skipped: list[str]) -> list[Case]:
    base = _base(src, "training")
    cases = []
    for folder, split in (("training", "train"), ("test", "test")):
        for path in _files(base / folder / "images"):
            number = path.stem.split("_")[0]
            manual = sorted((base / folder / "1st_manual").glob(f"{number}_manual1.*"))
            if manual:
                cases.append(Case(path.stem, path, (manual[0],), split))
            else:
                skipped.append(f"{path}: no 1st_manual/{number}_manual1.gif")
    return cases


# --- DSB 2018: stage1_train/<id>/images/<id>.png + stage1_train/<id>/masks/*.png (one per nucleus)


def _dsb2018(src: Path, skipped: list[str]) -> list[Case]:
    base = src / "stage1_train" if (src / "stage1_train").is_dir() else src
    cases = []
    for folder in sorted(d for d in base.iterdir() if d.is_dir() and (d / "images").is_dir()):
        images, masks = _files(folder / "images"), _files(folder / "masks")
        if len(images) == 1 and masks:
            cases.append(Case(folder.name, images[0], tuple(masks)))
        else:
            skipped.append(f"{folder}: {len(images)} images and {len(masks)} masks (expected 1 and >= 1)")
    return cases


# --- BUSI: Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (N).png + <cls> (N)_mask.png [+ _mask_1.png]

_BUSI_NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)$")


def _busi(src: Path, skipped: list[str]) -> list[Case]:
    base = _base(src, "benign")
    cases = []
    for cls in ("benign", "malignant", "normal"):
        for path in _files(base / cls):
            match = _BUSI_NAME.match(path.stem)
            if match is None:
                continue
            masks = tuple(sorted(base.joinpath(cls).glob(f"{path.stem}_mask*{path.suffix}")))
            if masks:
                cases.append(Case(f"{cls}_{int(match[2]):03d}", path, masks, group=cls))
            else:
                skipped.append(f"{path}: no {path.stem}_mask{path.suffix}")
    return cases


FORMATS: dict[str, _Layout] = {
    "nnunet": _Layout(
        _nnunet,
        None,
        "nnU-Net raw: imagesTr/<case>_0000.png, labelsTr/<case>.png, optional imagesTs/labelsTs, "
        "dataset.json",
        "Isensee et al., nnU-Net, Nature Methods 18:203-211, 2021 (dataset layout); cite the original "
        "dataset",
    ),
    "isic": _Layout(
        _isic,
        "dermoscopy",
        "ISIC challenge: ISIC-2017_Training_Data/ + ISIC-2017_Training_Part1_GroundTruth/ (or "
        "ISIC2018_Task1-2_Training_Input/ + ISIC2018_Task1_Training_GroundTruth/), Validation and Test alike",
        "Codella et al., ISIC 2017 (ISBI 2018) / ISIC 2018 challenge (arXiv:1902.03368); licence as released",
    ),
    "kvasir": _Layout(
        _kvasir,
        "colonoscopy",
        "Kvasir-SEG: images/<id>.jpg and masks/<id>.jpg",
        "Jha et al., Kvasir-SEG: a segmented polyp dataset, MMM 2020; research and education use",
    ),
    "drive": _Layout(
        _drive,
        "fundus",
        "DRIVE: training/images/21_training.tif + training/1st_manual/21_manual1.gif, test/ alike",
        "Staal et al., Ridge-based vessel segmentation in color images of the retina, IEEE TMI 23(4), 2004",
    ),
    "dsb2018": _Layout(
        _dsb2018,
        "microscopy",
        "DSB 2018: stage1_train/<id>/images/<id>.png + stage1_train/<id>/masks/*.png",
        "Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, "
        "Nature Methods 16:1247-1253, 2019; CC0",
    ),
    "busi": _Layout(
        _busi,
        "ultrasound",
        "BUSI: Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (N).png + <cls> (N)_mask.png",
        "Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 28:104863, 2020; CC0",
    ),
}
