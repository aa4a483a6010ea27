from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from espmedsam.data.dataset import (
    KNOWN_DATASETS,
    DatasetSource,
    Sample,
    SegmentationFolder,
    parse_dataset_arg,
    to_rgb,
)
from espmedsam.errors import DataError, InputError
from espmedsam.modalities import MODALITIES


def test_known_datasets_use_known_modalities():
    assert set(KNOWN_DATASETS.values()) == set(MODALITIES)
    assert KNOWN_DATASETS["drive"] == "fundus"


def test_parse_explicit_modality(make_dataset):
    root = make_dataset()
    assert parse_dataset_arg(f"{root}:Fundus") == DatasetSource(root, "fundus", "fake")
    assert parse_dataset_arg(f"{root}:4").modality == "microscopy"


def test_parse_known_folder_name(make_dataset):
    assert parse_dataset_arg(str(make_dataset("busi"))).modality == "ultrasound"


def test_parse_modality_from_dataset_json(make_dataset):
    root = make_dataset()
    (root / "dataset.json").write_text(json.dumps({"modality": "xray"}))
    assert parse_dataset_arg(str(root)).modality == "xray"


def test_parse_errors(make_dataset, tmp_path):
    root = make_dataset()
    with pytest.raises(DataError, match=r"unknown modality; write .*:MODALITY"):
        parse_dataset_arg(str(root))
    assert parse_dataset_arg(f"{root}:mri").modality == "mri"  # a modality to add to a model
    with pytest.raises(InputError, match="modality name 'MRI scan' must start with a lower-case letter"):
        parse_dataset_arg(f"{root}:MRI scan")
    with pytest.raises(DataError, match="dataset folder not found"):
        parse_dataset_arg(str(tmp_path / "nowhere"))
    (root / "dataset.json").write_text(json.dumps({"modality": "PET/CT"}))
    with pytest.raises(DataError, match="dataset.json: modality name 'PET/CT'"):
        parse_dataset_arg(str(root))


def test_samples_in_split_order(make_dataset):
    root = make_dataset(split={"train": ["c", "a"], "val": ["b"], "test": ["d", "e"]}, gray=True)
    folder = SegmentationFolder(DatasetSource(root, "xray", "fake"), "train")
    assert len(folder) == 2 and folder.stems == ("c", "a")
    sample = folder[0]
    assert isinstance(sample, Sample) and (sample.stem, sample.modality, sample.dataset) == (
        "c",
        "xray",
        "fake",
    )
    assert sample.image.shape == (20, 24, 3) and sample.image.dtype == np.uint8
    assert np.array_equal(sample.image[..., 0], sample.image[..., 2])
    assert sample.mask.dtype == bool and sample.mask.sum() == 5 * 6


def test_all_stems_without_split_and_jpeg_images(make_dataset):
    root = make_dataset(image_suffix=".jpg")
    (root / "split.json").unlink()
    folder = SegmentationFolder(DatasetSource(root, "fundus", "fake"))
    assert folder.stems == ("a", "b", "c", "d", "e")


def test_cache_keeps_arrays(make_dataset):
    root = make_dataset()
    folder = SegmentationFolder(DatasetSource(root, "fundus", "fake"), "test", cache=True)
    first = folder[0]
    (root / "images" / "e.png").unlink()
    assert folder[0].image is first.image


def test_released_cache_reads_the_file_again(make_dataset):
    root = make_dataset()
    folder = SegmentationFolder(DatasetSource(root, "fundus", "fake"), "test", cache=True)
    first = folder[0]
    folder.release_cache()
    again = folder[0]  # decoded again from the file
    assert again.image is not first.image and np.array_equal(again.image, first.image)


def test_mask_with_other_suffix(make_dataset):
    root = make_dataset()
    Image.open(root / "masks" / "a.png").save(root / "masks" / "a.bmp")
    (root / "masks" / "a.png").unlink()
    assert SegmentationFolder(DatasetSource(root, "fundus", "x"), "train")[0].mask.any()


@pytest.mark.parametrize(
    "change, split, message",
    [
        (lambda r: (r / "split.json").unlink(), "train", "no split.json"),
        (lambda r: None, "holdout", "unknown split 'holdout'"),
        (lambda r: (r / "masks" / "b.png").unlink(), "train", "no mask of stem 'b'"),
        (lambda r: (r / "images" / "a.png").unlink(), "train", "no image of stem 'a'"),
        (lambda r: (r / "split.json").write_text("{"), "train", "invalid JSON"),
        (lambda r: (r / "split.json").write_text('{"train": "a"}'), "train", "expected"),
    ],
)
def test_folder_errors(make_dataset, change, split, message):
    root = make_dataset()
    change(root)
    with pytest.raises(DataError, match=message):
        SegmentationFolder(DatasetSource(root, "fundus", "x"), split)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        SegmentationFolder(DatasetSource(tmp_path / "none", "fundus", "x"))


def test_size_mismatch_on_read(make_dataset):
    root = make_dataset()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "a.png")
    with pytest.raises(DataError, match="a.png: mask size 5x5 differs"):
        SegmentationFolder(DatasetSource(root, "fundus", "x"), "train")[0]


def test_to_rgb_shapes():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert to_rgb(gray).shape == (2, 3, 3)
    assert to_rgb(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 3)
