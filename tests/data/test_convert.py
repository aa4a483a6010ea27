from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmedsam.data.check import check_dataset
from espmedsam.data.convert import FORMATS, assign_splits, convert_dataset
from espmedsam.data.dataset import DatasetSource, SegmentationFolder, parse_dataset_arg
from espmedsam.errors import DataError, InputError

H, W = 20, 24


def _image(path: Path, seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (H, W, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode).save(path)


def _mask(path: Path, seed: int, value: int = 255, box=None) -> None:
    mask = np.zeros((H, W), np.uint8)
    top, left = box or (seed % 5, seed % 7)
    mask[top : top + 6, left : left + 8] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def _nnunet(src: Path) -> None:
    for i in range(4):
        _image(src / "imagesTr" / f"case_{i:03d}_0000.png", i)
        _mask(src / "labelsTr" / f"case_{i:03d}.png", i, value=1)
    _image(src / "imagesTs" / "case_100_0000.png", 9)
    (src / "dataset.json").write_text(
        json.dumps({"file_ending": ".png", "labels": {"background": 0, "x": 1}})
    )


def _isic(src: Path) -> None:
    for split, start in (("Training", 0), ("Validation", 10), ("Test_v2", 20)):
        for i in range(start, start + 2):
            _image(src / f"ISIC-2017_{split}_Data" / f"ISIC_{i:07d}.jpg", i)
            _image(src / f"ISIC-2017_{split}_Data" / f"ISIC_{i:07d}_superpixels.png", i)
            _mask(src / f"ISIC-2017_{split}_Part1_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", i)


def _isic2018(src: Path) -> None:
    for i in range(3):
        _image(src / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg", i)
        _mask(src / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", i)
    _image(src / "ISIC2018_Task1-2_Test_Input" / "ISIC_0000100.jpg", 9)
    _mask(src / "ISIC2018_Task1_Test_GroundTruth" / "ISIC_0000100_segmentation.png", 9)


def _kvasir(src: Path) -> None:
    for i in range(5):
        _image(src / "Kvasir-SEG" / "images" / f"cju{i}.jpg", i)
        mask = np.zeros((H, W), np.uint8)
        mask[2:10, 3:12] = 230
        mask[15, 15] = 90  # JPEG ringing below the threshold
        (src / "Kvasir-SEG" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(src / "Kvasir-SEG" / "masks" / f"cju{i}.jpg", quality=95)


def _drive(src: Path) -> None:
    for folder, numbers in (("training", (21, 22, 23)), ("test", (1, 2))):
        for n in numbers:
            name = f"{n:02d}_{folder}"
            _image(src / "DRIVE" / folder / "images" / f"{name}.tif", n)
            _mask(src / "DRIVE" / folder / "1st_manual" / f"{n:02d}_manual1.gif", n)
            _mask(src / "DRIVE" / folder / "mask" / f"{name}_mask.gif", n)


def _dsb2018(src: Path) -> None:
    for i in range(4):
        case = src / "stage1_train" / f"{i:04x}abcd"
        _image(case / "images" / f"{case.name}.png", i, mode="RGBA")
        _mask(case / "masks" / "n1.png", i, box=(0, 0))
        _mask(case / "masks" / "n2.png", i, box=(12, 14))


def _busi(src: Path) -> None:
    base = src / "Dataset_BUSI_with_GT"
    for cls, count in (("benign", 2), ("malignant", 2), ("normal", 1)):
        for n in range(1, count + 1):
            _image(base / cls / f"{cls} ({n}).png", n, mode="L")
            _mask(base / cls / f"{cls} ({n}).png".replace(".png", "_mask.png"), n, box=(0, 0))
    _mask(base / "benign" / "benign (1)_mask_1.png", 1, box=(12, 14))
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(base / "malignant" / "malignant (2)_mask_1.png")


BUILDERS = {
    "nnunet": _nnunet,
    "isic": _isic,
    "kvasir": _kvasir,
    "drive": _drive,
    "dsb2018": _dsb2018,
    "busi": _busi,
}


def test_every_format_has_a_test():
    assert set(BUILDERS) == set(FORMATS)


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_converted_folder_passes_check(tmp_path, fmt):
    BUILDERS[fmt](tmp_path / "src")
    report = convert_dataset(fmt, tmp_path / "src", tmp_path / "out")
    check = check_dataset(tmp_path / "out")
    assert check.errors == (), check.errors
    assert check.pairs == sum(report.splits.values()) >= 3
    assert all(p.message in ("empty mask",) for p in check.warnings), check.warnings
    assert (tmp_path / "out" / "SOURCE.md").read_text().startswith("# out (converted from the")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    for path in (tmp_path / "out" / "masks").iterdir():
        assert set(np.unique(np.asarray(Image.open(path)))) <= {0, 255}


def test_official_splits_kept(tmp_path):
    _isic(tmp_path / "src")
    report = convert_dataset("isic", tmp_path / "src", tmp_path / "out")
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split == {
        "train": ["ISIC_0000000", "ISIC_0000001"],
        "val": ["ISIC_0000010", "ISIC_0000011"],
        "test": ["ISIC_0000020", "ISIC_0000021"],
    }
    assert report.skipped == ()
    assert sorted(p.suffix for p in (tmp_path / "out" / "images").iterdir()) == [".jpg"] * 6
    assert parse_dataset_arg(str(tmp_path / "out")).modality == "dermoscopy"


def test_isic2018_naming_and_val_from_train(tmp_path):
    _isic2018(tmp_path / "src")
    report = convert_dataset("isic", tmp_path / "src", tmp_path / "out")
    assert report.splits == {"train": 2, "val": 1, "test": 1}


def test_drive_official_split_and_gif_masks(tmp_path):
    _drive(tmp_path / "src")
    convert_dataset("drive", tmp_path / "src", tmp_path / "out", seed=3)
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["test"] == ["01_test", "02_test"] and len(split["train"]) == 2 and len(split["val"]) == 1
    folder = SegmentationFolder(DatasetSource(tmp_path / "out", "fundus", "out"), "test")
    assert folder[0].mask.sum() == 6 * 8


def test_dsb_masks_merged_and_alpha_dropped(tmp_path):
    _dsb2018(tmp_path / "src")
    convert_dataset("dsb2018", tmp_path / "src", tmp_path / "out")
    image = np.asarray(Image.open(tmp_path / "out" / "images" / "0000abcd.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "0000abcd.png"))
    assert image.shape == (H, W, 3) and (mask > 0).sum() == 2 * 6 * 8


def test_busi_masks_merged_mismatch_skipped_and_normal_optional(tmp_path):
    _busi(tmp_path / "src")
    report = convert_dataset("busi", tmp_path / "src", tmp_path / "out")
    assert sum(report.splits.values()) == 5
    assert len(report.skipped) == 1 and "malignant (2)_mask_1.png: mask is 5x5" in report.skipped[0]
    assert (np.asarray(Image.open(tmp_path / "out" / "masks" / "benign_001.png")) > 0).sum() == 2 * 6 * 8
    assert np.asarray(Image.open(tmp_path / "out" / "images" / "benign_001.png")).ndim == 2
    report = convert_dataset("busi", tmp_path / "src", tmp_path / "out2", skip_normal=True)
    assert sum(report.splits.values()) == 4
    assert "normal_001" not in (tmp_path / "out2" / "split.json").read_text()


def test_kvasir_jpeg_masks_binarised_at_127(tmp_path):
    _kvasir(tmp_path / "src")
    convert_dataset("kvasir", tmp_path / "src", tmp_path / "out")
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "cju0.png"))
    assert mask[15, 15] == 0 and (mask > 0).sum() == 8 * 9


def test_nnunet_test_images_without_labels_are_noted(tmp_path):
    _nnunet(tmp_path / "src")
    report = convert_dataset("nnunet", tmp_path / "src", tmp_path / "out")
    assert sum(report.splits.values()) == 4 and "no labelsTs" in report.skipped[0]
    assert "no labelsTs" in (tmp_path / "out" / "SOURCE.md").read_text()


def test_nnunet_volumes_rejected(tmp_path):
    (tmp_path / "src" / "imagesTr").mkdir(parents=True)
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    with pytest.raises(DataError, match="2D natural-image files"):
        convert_dataset("nnunet", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_max_side_shrinks_image_and_mask(tmp_path):
    _kvasir(tmp_path / "src")
    convert_dataset("kvasir", tmp_path / "src", tmp_path / "out", max_side=12)
    image = np.asarray(Image.open(tmp_path / "out" / "images" / "cju1.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "cju1.png"))
    assert image.shape == (10, 12, 3) and mask.shape == (10, 12) and set(np.unique(mask)) == {0, 255}


def test_random_split_is_seeded_and_complete():
    stems = [(f"s{i}", None) for i in range(20)]
    first, again, other = assign_splits(stems, 0), assign_splits(stems, 0), assign_splits(stems, 1)
    assert first == again and first != other
    assert {k: len(v) for k, v in first.items()} == {"train": 14, "val": 2, "test": 4}
    assert sorted(sum(first.values(), [])) == sorted(s for s, _ in stems)


@pytest.mark.parametrize(
    "fmt, make, options, error, message",
    [
        ("coco", True, {}, InputError, "unknown dataset format 'coco'"),
        ("kvasir", False, {}, DataError, "source folder not found"),
        ("drive", True, {}, DataError, "no drive cases found"),
        ("kvasir", True, {"max_side": 0}, InputError, "--max-side must be positive"),
    ],
)
def test_errors(tmp_path, fmt, make, options, error, message):
    if make:
        _kvasir(tmp_path / "src")
    with pytest.raises(error, match=message):
        convert_dataset(fmt, tmp_path / "src", tmp_path / "out", **options)


def test_refuses_non_empty_output(tmp_path):
    _kvasir(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        convert_dataset("kvasir", tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"
