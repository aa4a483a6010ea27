from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from espmedsam import build_model
from espmedsam.checkpoints.native import save_model
from espmedsam.cli import app
from espmedsam.errors import InputError
from espmedsam.parts import merge_predictions, part_csv_name, select_part

runner = CliRunner()


@pytest.mark.parametrize("count, num_parts", [(10, 1), (10, 3), (7, 7), (3, 5), (100, 8)])
def test_parts_cover_every_input_once(count, num_parts):
    inputs = [f"case{i}.png" for i in range(count)]
    parts = [select_part(inputs, num_parts, k) for k in range(num_parts)]
    flat = [item for part in parts for item in part]
    assert sorted(flat) == sorted(inputs) and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("num_parts, part_id", [(0, 0), (3, 3), (3, -1)])
def test_a_part_outside_the_range_is_refused(num_parts, part_id):
    with pytest.raises(InputError, match="--num-parts|--part-id"):
        select_part(["a"], num_parts, part_id)


def test_part_table_names():
    assert part_csv_name(1, 0) == "predictions.csv"
    assert part_csv_name(4, 2) == "predictions.part2of4.csv"


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.pop("seconds")  # timing differs between runs; every other column must not
        row["outputs"] = row["outputs"].replace(str(path.parent), "OUT")
    return rows


def test_merged_parts_equal_a_single_run(tmp_path):
    checkpoint = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(
            images / f"fundus_{i}.png"
        )
    common = ["predict", str(images), "-c", str(checkpoint), "--size", "64", "--no-overlays"]
    single = runner.invoke(app, [*common, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    spread = tmp_path / "spread"
    for part in range(3):
        result = runner.invoke(
            app, [*common, "--out", str(spread), "--num-parts", "3", "--part-id", str(part)]
        )
        assert result.exit_code == 0, result.output
        assert f"predictions.part{part}of3.csv" in result.output
    assert not (spread / "predictions.csv").exists()
    merged = runner.invoke(app, ["predictions", "merge", str(spread)])
    assert merged.exit_code == 0, merged.output
    assert _table(spread / "predictions.csv") == _table(tmp_path / "single" / "predictions.csv")
    assert sorted(p.name for p in spread.glob("*_mask.png")) == [f"fundus_{i}_mask.png" for i in range(5)]


def test_a_part_with_no_inputs_still_writes_its_table(tmp_path):
    checkpoint = save_model(build_model("tiny"), tmp_path / "tiny.safetensors")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "fundus_0.png")
    args = ["predict", str(tmp_path / "fundus_0.png"), "-c", str(checkpoint), "--size", "64"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--num-parts", "2", "--part-id", "1"])
    assert result.exit_code == 0, result.output
    assert _table(tmp_path / "out" / "predictions.part1of2.csv") == []


def _write_part(folder: Path, name: str, rows: list[str], header: str = "file,modality") -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("\n".join([header, *rows]) + "\n")


def test_merge_interleaves_rows_back_into_input_order(tmp_path):
    _write_part(tmp_path, "predictions.part0of2.csv", ["a,xray", "c,xray", "e,xray"])
    _write_part(tmp_path, "predictions.part1of2.csv", ["b,fundus", "d,fundus"])
    target, rows = merge_predictions(tmp_path)
    assert rows == 5
    assert [row["file"] for row in csv.DictReader(target.open())] == list("abcde")


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "no predictions.partKofN.csv"),
        (["predictions.part0of3.csv", "predictions.part2of3.csv"], "part(s) 1 of 3 missing"),
        (["predictions.part0of2.csv", "predictions.part1of3.csv"], "different --num-parts"),
    ],
)
def test_merge_refuses_incomplete_or_mixed_parts(tmp_path, names, message):
    for name in names:
        _write_part(tmp_path, name, ["a,xray"])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge_predictions(tmp_path)


def test_merge_refuses_parts_with_different_columns(tmp_path):
    _write_part(tmp_path, "predictions.part0of2.csv", ["a,xray"])
    _write_part(tmp_path, "predictions.part1of2.csv", ["b"], header="file")
    with pytest.raises(InputError, match="columns differ"):
        merge_predictions(tmp_path)


def test_an_empty_part_into_a_file_named_out_is_one_line(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "fundus_0.png")
    (tmp_path / "taken").write_text("a file, not a folder")
    args = ["predict", str(tmp_path / "fundus_0.png"), "--out", str(tmp_path / "taken")]
    result = runner.invoke(app, [*args, "--num-parts", "2", "--part-id", "1"])
    assert result.exit_code != 0 and "not a folder" in str(result.exception)
