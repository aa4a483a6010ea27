from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from espmedsam import build_model, load_model
from espmedsam.checkpoints.native import save_model
from espmedsam.cli import app
from espmedsam.data.dataset import parse_dataset_arg
from espmedsam.errors import InputError
from espmedsam.evaluate import (
    ImageResult,
    WorstCases,
    dice_distribution,
    evaluate,
    summarise_rows,
    summary_markdown,
)
from espmedsam.models.image_io import RawImageIO
from espmedsam.predict import Predictor

H, W = 40, 50
METRIC_KEYS = {"mean", "std", "n", "n_skipped"}


def _square(top: int, left: int, side: int = 10) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _write_dataset(root: Path, masks: dict[str, np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, mask in masks.items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")
    (root / "split.json").write_text(json.dumps({"train": [], "val": [], "test": sorted(masks)}))
    return root


class SquarePredictor(Predictor):
    """Predicts the same 10 x 10 square at (10, 10) for every image, so the metrics are known exactly."""

    def __init__(self) -> None:
        super().__init__(build_model("tiny"))

    def predict_logits(self, image, modality):
        return np.where(_square(10, 10), 10.0, -10.0).astype(np.float32)


@pytest.fixture
def fake_dataset(tmp_path) -> Path:
    # a: exact hit; b: shifted 2 columns; c: empty ground truth
    masks = {"a": _square(10, 10), "b": _square(10, 12), "c": np.zeros((H, W), dtype=bool)}
    return _write_dataset(tmp_path / "fakeds", masks)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return save_model(build_model("tiny"), tmp_path / "tiny.safetensors")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_native_protocol_values_and_files(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    report = evaluate(SquarePredictor(), [source], out_dir=tmp_path / "report", overlays=2)

    rows = {row["stem"]: row for row in _read_csv(tmp_path / "report" / "per_image.csv")}
    assert list(next(iter(rows.values()))) == [
        "dataset", "modality", "stem", "dice", "iou", "hd95", "nsd", "height", "width", "predicted_dice"
    ]  # fmt: skip
    assert {row["predicted_dice"] for row in rows.values()} == {""}  # no calibrated quality score
    assert sorted(rows) == ["a", "b", "c"]
    assert {(row["dataset"], row["modality"], row["height"], row["width"]) for row in rows.values()} == {
        ("fakeds", "fundus", "40", "50")
    }
    assert float(rows["a"]["dice"]) == 1.0 and float(rows["a"]["hd95"]) == 0.0
    assert float(rows["b"]["dice"]) == pytest.approx(0.8) and float(rows["b"]["iou"]) == pytest.approx(
        80 / 120
    )
    assert float(rows["b"]["hd95"]) == pytest.approx(2.0) and float(rows["b"]["nsd"]) == 1.0
    assert float(rows["c"]["dice"]) == 0.0 and math.isnan(float(rows["c"]["hd95"]))

    entry = report.summary["datasets"]["fakeds"]
    assert entry["dice"]["mean"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert (entry["hd95"]["n"], entry["hd95"]["n_skipped"]) == (2, 1)
    assert (entry["nsd"]["n"], entry["nsd"]["n_skipped"]) == (2, 1)
    assert (entry["dice"]["n"], entry["dice"]["n_skipped"]) == (3, 0)
    assert len(list((tmp_path / "report" / "overlays" / "fakeds").glob("*.png"))) == 2
    assert "fakeds (fundus)" in (tmp_path / "report" / "summary.md").read_text()


def test_summary_json_structure(tmp_path, fake_dataset):
    other = _write_dataset(tmp_path / "otherds", {"x": _square(10, 10)})
    sources = [parse_dataset_arg(f"{fake_dataset}:fundus"), parse_dataset_arg(f"{other}:xray")]
    evaluate(SquarePredictor(), sources, out_dir=tmp_path / "report", checkpoint="ckpt.safetensors")

    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert set(summary) == {
        "protocol", "split", "checkpoint", "resolution", "hausdorff_percentile", "nsd_tolerance_px",
        "empty_rule", "datasets", "modalities", "overall", "failed",
    }  # fmt: skip
    assert (summary["protocol"], summary["split"], summary["checkpoint"]) == (
        "native",
        "test",
        "ckpt.safetensors",
    )
    assert set(summary["datasets"]) == {"fakeds", "otherds"}
    for entry in summary["datasets"].values():
        assert set(entry) == {"modality", "n", "dice", "iou", "hd95", "nsd", "dice_distribution"}
        assert set(entry["dice_distribution"]) == {"median", "p10", "threshold", "n_below"}
        assert all(set(entry[metric]) == METRIC_KEYS for metric in ("dice", "iou", "hd95", "nsd"))
    assert summary["datasets"]["otherds"]["modality"] == "xray"
    assert summary["datasets"]["fakeds"]["n"] == 3
    assert set(summary["modalities"]) == {"fundus", "xray"}
    assert summary["modalities"]["fundus"]["datasets"] == ["fakeds"]

    overall = summary["overall"]
    assert overall["aggregation"] == "mean of dataset means"
    assert overall["dice"]["mean"] == pytest.approx((1.8 / 3 + 1.0) / 2)
    assert overall["pooled"]["dice"]["mean"] == pytest.approx(2.8 / 4)
    assert (overall["n"], overall["n_datasets"]) == (4, 2)


def test_paper_protocol_scores_at_1024(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    report = evaluate(SquarePredictor(), [source], out_dir=tmp_path / "report", protocol="paper", overlays=0)
    rows = {row.stem: row for row in report.rows}
    # a 2-column shift at width 50 is 2 * 1024 / 50 = 41 pixels at 1024 x 1024; bilinear resizing rounds
    # the predicted square's corners, so the 100th percentile lies a little above
    assert 2 * 1024 / W <= rows["b"].hd95 <= 1.1 * 2 * 1024 / W
    assert rows["b"].dice == pytest.approx(0.8, abs=0.01)
    assert (rows["b"].height, rows["b"].width) == (H, W)
    assert report.summary["hausdorff_percentile"] == 100.0
    assert report.summary["resolution"] == "1024x1024"
    assert "HD100" in report.summary_md.read_text()
    assert not (tmp_path / "report" / "overlays").exists()


def test_real_model_end_to_end(tmp_path, fake_dataset, tiny_checkpoint):
    source = parse_dataset_arg(f"{fake_dataset}:dermoscopy")
    seen = []
    report = evaluate(
        load_model(tiny_checkpoint),
        [source],
        out_dir=tmp_path / "report",
        size=64,
        overlays=1,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len(report.rows) == 3
    assert all(0.0 <= row.dice <= 1.0 for row in report.rows)
    assert report.per_image_csv.is_file() and report.summary_json.is_file()
    assert not list((tmp_path / "report").glob(".*.tmp"))


def test_errors(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    with pytest.raises(InputError, match="protocol"):
        evaluate(SquarePredictor(), [source], out_dir=tmp_path, protocol="official")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="fakeds"):
        evaluate(SquarePredictor(), [source, source], out_dir=tmp_path)
    with pytest.raises(InputError, match="no dataset"):
        evaluate(SquarePredictor(), [], out_dir=tmp_path)


def test_cli_evaluate(tmp_path, fake_dataset, tiny_checkpoint):
    out = tmp_path / "report"
    args = ["evaluate", "--data", f"{fake_dataset}:fundus", "-c", str(tiny_checkpoint), "--size", "64"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--overlays", "1"])
    assert result.exit_code == 0, result.output
    assert "fakeds" in result.output and "overall" in result.output
    assert {p.name for p in out.iterdir()} == {"per_image.csv", "summary.json", "summary.md", "overlays"}
    assert json.loads((out / "summary.json").read_text())["checkpoint"] == str(tiny_checkpoint)


def test_cli_evaluate_bad_protocol_exits_2(tmp_path, fake_dataset, tiny_checkpoint):
    args = ["evaluate", "--data", f"{fake_dataset}:fundus", "-c", str(tiny_checkpoint), "--protocol", "x"]
    result = subprocess.run(
        [sys.executable, "-m", "espmedsam", *args, "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "error: unknown protocol 'x'" in result.stderr
    assert not (tmp_path / "report").exists()


def test_cli_evaluates_a_unet_baseline_checkpoint(tmp_path, fake_dataset):
    from espmedsam.checkpoints.native import save_unet
    from espmedsam.models.unet import UNetBaseline, UNetConfig

    unet = save_unet(UNetBaseline(UNetConfig(features=(4, 4, 8, 8, 16, 4))), tmp_path / "unet.safetensors")
    out = tmp_path / "report"
    data = f"{fake_dataset}:fundus"
    args = ["evaluate", "--data", data, "-c", str(unet), "--size", "64", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["datasets"]["fakeds"]["n"] == 3


class SizeSensitiveModel(RawImageIO, torch.nn.Module):
    """Marks everything foreground at input side 64 and nothing at any other side."""

    def __init__(self) -> None:
        super().__init__()
        from espmedsam.config import ModelConfig

        self.config = dataclasses.replace(ModelConfig(), image_size=32)
        self.register_pixel_statistics(self.config.pixel_mean, self.config.pixel_std)

    def forward(self, images, modality):
        value = 10.0 if images.shape[-1] == 64 else -10.0
        return SimpleNamespace(masks=torch.full((images.shape[0], 1, *images.shape[-2:]), value))


def test_choose_input_sizes_finds_the_size_that_scores_best(fake_dataset):
    from espmedsam.evaluate import choose_input_sizes

    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    scores = choose_input_sizes(SizeSensitiveModel(), [source], [32, 64], split="test")
    # at 64 every pixel is foreground: Dice 2*100/(100+2000) for the squares, 0 for the empty mask;
    # at 32 nothing is: Dice 0 for the squares, 1 for the empty mask (both empty)
    assert scores["fundus"][64] == pytest.approx(2 * (200 / 2100) / 3)
    assert scores["fundus"][32] == pytest.approx(1 / 3)


def test_cli_export_chooses_sizes_on_validation_data(tmp_path, fake_dataset, tiny_checkpoint):
    split = json.loads((fake_dataset / "split.json").read_text())
    (fake_dataset / "split.json").write_text(json.dumps({**split, "val": split["test"]}))
    out = tmp_path / "ship.safetensors"
    args = ["export", str(tiny_checkpoint), "-o", str(out), "--choose-sizes-on", f"{fake_dataset}:fundus"]
    result = CliRunner().invoke(app, [*args, "--candidates", "32,64"])
    assert result.exit_code == 0, result.output
    assert "modality" in result.output and "64²" in result.output
    sizes = load_model(out).config.inference_sizes
    assert sizes[3] in (32, 64) and sizes[:3] + sizes[4:] == (64,) * 5  # only fundus was chosen
    assert (tmp_path / "ship_sizes.png").stat().st_size > 1000  # the front, drawn beside the checkpoint


def test_the_cheapest_size_within_the_tolerance_is_chosen():
    from espmedsam.size_front import cheapest_within

    scores = {192: 0.800, 256: 0.812, 384: 0.815, 512: 0.813}
    costs = {192: 40.0, 256: 70.0, 384: 160.0, 512: 290.0}
    assert cheapest_within(scores, costs, tolerance=0.005) == 256  # 0.812 >= 0.815 - 0.005
    assert cheapest_within(scores, costs, tolerance=0.0) == 384
    assert cheapest_within(scores, costs, tolerance=0.02) == 192
    assert cheapest_within({256: 0.8, 128: 0.8}, {256: 1.0, 128: 1.0}) == 128  # equal cost: smaller side
    with pytest.raises(ValueError, match="no candidate"):
        cheapest_within({}, {})


def test_forward_cost_rises_with_the_input_side():
    from espmedsam.size_front import forward_gflop

    costs = forward_gflop(build_model("tiny").eval(), "fundus", [32, 64])
    assert 0 < costs[32] < costs[64]


def test_reading_in_worker_processes_gives_the_same_report(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    model = build_model("tiny")
    inline = evaluate(Predictor(model, device="cpu"), [source], out_dir=tmp_path / "inline", workers=0)
    ahead = evaluate(Predictor(model, device="cpu"), [source], out_dir=tmp_path / "ahead", workers=2)
    assert [row.stem for row in ahead.rows] == ["a", "b", "c"]
    assert ahead.rows == inline.rows


def test_dice_distribution_of_known_values():
    # sorted 0, 0.4, 0.8, 1: median (0.4 + 0.8) / 2; P10 at rank 0.3: 0 + 0.3 * 0.4; two below 0.5
    block = dice_distribution([1.0, 0.0, 0.8, 0.4, math.nan])
    assert block["median"] == pytest.approx(0.6) and block["p10"] == pytest.approx(0.12)
    assert (block["threshold"], block["n_below"]) == (0.5, 2)
    empty = dice_distribution([math.nan])
    assert math.isnan(empty["median"]) and math.isnan(empty["p10"]) and empty["n_below"] == 0


def test_summary_has_the_dice_distribution_per_dataset(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    evaluate(SquarePredictor(), [source], out_dir=tmp_path / "report", overlays=0)
    # Dice 1, 0.8, 0: median 0.8, P10 at rank 0.2: 0 + 0.2 * 0.8, one below 0.5
    entry = json.loads((tmp_path / "report" / "summary.json").read_text())["datasets"]["fakeds"]
    assert entry["dice_distribution"] == pytest.approx(
        {"median": 0.8, "p10": 0.16, "threshold": 0.5, "n_below": 1}
    )
    assert entry["dice"]["mean"] == pytest.approx(1.8 / 3)  # the existing keys are unchanged
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "| dataset | n | median Dice | P10 Dice | < 0.5 |" in text
    assert "| fakeds | 3 | 0.800 | 0.160 | 1 |" in text


def test_summary_markdown_reads_a_summary_without_the_distribution():
    rows = [ImageResult("d", "fundus", "a", 1.0, 1.0, 0.0, 1.0, 4, 4)]
    summary = summarise_rows(rows)
    del summary["datasets"]["d"]["dice_distribution"]
    assert "median Dice" not in summary_markdown(summary)


def test_worst_cases_keep_the_lowest_dice_first_offered_on_ties():
    worst = WorstCases(2)
    blank = np.zeros((4, 4), bool)
    for dice, stem in [(0.9, "a"), (0.2, "b"), (0.5, "c"), (0.2, "d"), (0.1, "e"), (math.nan, "f")]:
        worst.offer(dice, stem, np.zeros((4, 4, 3), np.uint8), blank, blank)
    assert [(case.stem, case.dice) for case in worst.cases()] == [("e", 0.1), ("b", 0.2)]
    none = WorstCases(0)
    none.offer(0.0, "a", np.zeros((4, 4, 3), np.uint8), blank, blank)
    assert len(none) == 0


def test_worst_montage_holds_the_k_lowest_dice_images(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    report = evaluate(SquarePredictor(), [source], out_dir=tmp_path / "report", overlays=0, worst=2)
    assert report.montages == (tmp_path / "report" / "worst_fakeds.png",)
    picture = np.asarray(Image.open(report.montages[0]))
    # two tiles (c: Dice 0, b: Dice 0.8) side by side: 256 px tiles, 16 px captions, a 2 px gap
    assert picture.shape == (256 + 16, 2 * 256 + 2, 3)
    left, right = picture[:256, :256], picture[:256, 258:]
    assert (left == (32, 224, 64)).all(axis=-1).sum() == 0  # c has no ground truth to outline
    assert (right == (32, 224, 64)).all(axis=-1).any()  # b's ground truth is outlined in green
    assert (picture[256:, :256] > 127).any() and (picture[256:, 258:] > 127).any()  # captions


def test_negative_worst_is_refused(tmp_path, fake_dataset):
    source = parse_dataset_arg(f"{fake_dataset}:fundus")
    with pytest.raises(InputError, match="worst"):
        evaluate(SquarePredictor(), [source], out_dir=tmp_path, worst=-1)


def test_cli_evaluate_worst_writes_a_montage(tmp_path, fake_dataset, tiny_checkpoint):
    out = tmp_path / "report"
    args = ["evaluate", "--data", f"{fake_dataset}:fundus", "-c", str(tiny_checkpoint), "--size", "64"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--overlays", "0", "--worst", "2"])
    assert result.exit_code == 0, result.output
    assert "worst_fakeds.png" in result.output
    assert {p.name for p in out.iterdir()} == {
        "per_image.csv",
        "summary.json",
        "summary.md",
        "worst_fakeds.png",
    }
    assert np.asarray(Image.open(out / "worst_fakeds.png")).shape == (256 + 16, 2 * 256 + 2, 3)
