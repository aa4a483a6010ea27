from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from espmedsam.data.check import DatasetReport, check_dataset
from espmedsam.errors import DataError

BUSI = Path(__file__).resolve().parents[3] / "shared" / "data" / "busi"


def _messages(report: DatasetReport) -> set[tuple[str, str, str]]:
    return {(p.severity, p.item, p.message) for p in report.problems}


def test_clean_dataset(make_dataset):
    report = check_dataset(make_dataset())
    assert report.pairs == 5 and report.splits == {"train": 3, "val": 1, "test": 1}
    assert report.problems == ()


def test_pairing_problems(make_dataset):
    root = make_dataset()
    (root / "masks" / "a.png").unlink()
    (root / "images" / "b.png").unlink()
    Image.open(root / "images" / "c.png").save(root / "images" / "c.bmp")
    (root / "images" / "notes.txt").write_text("x")
    found = _messages(check_dataset(root))
    assert ("error", "a", "image without mask") in found
    assert ("error", "b", "mask without image") in found
    assert ("error", "c", "2 image files for one stem: c.bmp, c.png") in found
    assert ("warning", "images/notes.txt", "not an image file; ignored") in found


def test_file_problems(make_dataset):
    root = make_dataset()
    (root / "images" / "a.png").write_bytes(b"broken")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "b.png")
    Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8).repeat(10, 0).repeat(12, 1)).save(
        root / "masks" / "c.png"
    )
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "d.png")
    report = check_dataset(root)
    found = _messages(report)
    assert any(s == "error" and i == "images/a.png" and m.startswith("unreadable") for s, i, m in found)
    assert ("error", "b", "image is 24x20 but mask is 5x5") in found
    assert ("warning", "c", "mask not binary (values 0, 1, 2, 255); read as > 0") in found
    assert ("warning", "d", "empty mask") in found
    assert [p.severity for p in report.problems] == ["error", "error", "warning", "warning"]
    assert len(report.errors) == 2 and len(report.warnings) == 2


def test_mask_of_zero_and_one_is_binary(make_dataset):
    root = make_dataset()
    Image.fromarray((np.asarray(Image.open(root / "masks" / "a.png")) > 0).astype(np.uint8)).save(
        root / "masks" / "a.png"
    )
    assert check_dataset(root).problems == ()


def test_split_problems(make_dataset):
    root = make_dataset(split={"train": ["a", "b", "x", "a"], "val": ["b"], "extra": ["c"]})
    found = _messages(check_dataset(root))
    assert ("error", "x", "in split 'train' but has no files") in found
    assert ("error", "b", "in several splits (train, val)") in found
    assert ("error", "a", "listed 2 times in split 'train'") in found
    assert ("warning", "split.json", "split 'extra' is not one of train, val, test") in found
    assert ("warning", "d", "in no split") in found and ("warning", "e", "in no split") in found


def test_missing_and_broken_split(make_dataset):
    root = make_dataset()
    (root / "split.json").unlink()
    report = check_dataset(root)
    assert report.errors == () and (
        "warning",
        "split.json",
        "no split.json; every pair is in no split",
    ) in _messages(report)
    (root / "split.json").write_text("[1]")
    assert check_dataset(root).errors[0].item == "split.json"


def test_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    report = check_dataset(tmp_path / "empty")
    assert {p.item for p in report.errors} == {"images/", "masks/"}
    with pytest.raises(DataError, match="dataset folder not found"):
        check_dataset(tmp_path / "none")


@pytest.mark.skipif(not BUSI.is_dir(), reason="shared BUSI data not available")
def test_real_busi_folder_is_clean():
    report = check_dataset(BUSI)
    split = json.loads((BUSI / "split.json").read_text())
    assert report.errors == () and report.splits == {k: len(v) for k, v in split.items()}
    assert report.pairs == sum(report.splits.values())
