from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from espmedsam.cli import app

runner = CliRunner()


def _espmedsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "espmedsam", *args], capture_output=True, text=True)


def test_check_clean_folders(make_dataset):
    first, second = make_dataset("one"), make_dataset("two")
    result = runner.invoke(app, ["data", "check", str(first), str(second)])
    assert result.exit_code == 0, result.output
    assert f"{first}: 5 pairs" in result.output and "train" in result.output
    assert result.output.count("0 errors, 0 warnings") == 2


def test_check_lists_problems_and_exits_3(make_dataset):
    root = make_dataset()
    (root / "masks" / "a.png").unlink()
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "b.png")
    result = runner.invoke(app, ["data", "check", str(root), "--limit", "1"])
    assert result.exit_code == 3, result.output
    assert "error a: image without mask" in result.output
    assert "... and 1 more" in result.output and "1 errors, 1 warnings" in result.output


def test_check_warnings_only_exit_0(make_dataset):
    root = make_dataset()
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "b.png")
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0 and "warning b: empty mask" in result.output


def test_check_missing_folder_is_one_line_error(tmp_path):
    result = _espmedsam("data", "check", str(tmp_path / "none"))
    assert result.returncode == 3 and result.stderr.startswith("error:")
    assert "dataset folder not found" in result.stderr and "Traceback" not in result.stderr


def test_import_kvasir(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / "src" / folder).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(
            tmp_path / "src" / "images" / f"k{i}.jpg"
        )
        mask = np.zeros((20, 24), np.uint8)
        mask[4:12, 5:15] = 255
        Image.fromarray(mask).save(tmp_path / "src" / "masks" / f"k{i}.jpg")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["data", "import", "--format", "kvasir", str(tmp_path / "src"), str(out), "--max-side", "12"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output.replace("\n", "")
    assert np.asarray(Image.open(out / "masks" / "k0.png")).shape == (10, 12)
    assert runner.invoke(app, ["data", "check", str(out)]).exit_code == 0


def test_import_errors_exit_codes(tmp_path):
    (tmp_path / "src").mkdir()
    unknown = _espmedsam("data", "import", "--format", "coco", str(tmp_path / "src"), str(tmp_path / "o"))
    assert unknown.returncode == 2 and "unknown dataset format 'coco'" in unknown.stderr
    empty = _espmedsam("data", "import", "--format", "busi", str(tmp_path / "src"), str(tmp_path / "o"))
    assert (
        empty.returncode == 3 and empty.stderr.startswith("error:") and "no busi cases found" in empty.stderr
    )
