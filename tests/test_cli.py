from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from espmedsam import build_model
from espmedsam.checkpoints.native import save_model
from espmedsam.cli import app

runner = CliRunner()


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return save_model(build_model("tiny"), tmp_path / "tiny.safetensors")


def _espmedsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "espmedsam", *args], capture_output=True, text=True)


def test_info_shows_parameter_table():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "shared TinyViT encoder" in result.output
    # the bundled weights: LiteMedSAM's encoder with trained controllers in its last stage, the refiner,
    # the detail branch, the classifier with its feature statistics, the promptable and click decoders
    assert "pointwise stem" in result.output and "controllers 6, in the" in result.output
    assert "embedding refiner" in result.output and "modality classifier" in result.output
    assert "detail branch" in result.output and "20,461,515" in result.output
    assert "promptable decoder" in result.output and "with feature statistics" in result.output
    assert "click decoder" in result.output
    assert "% of SAM ViT-B" in result.output


def test_info_lists_every_controller(tmp_path):
    path = save_model(build_model("default"), tmp_path / "default.safetensors")
    result = runner.invoke(app, ["info", "--checkpoint", str(path)])
    assert "controller: colonoscopy" in result.output and "28,881,521" in result.output


def test_info_of_checkpoint(tiny_checkpoint):
    result = runner.invoke(app, ["info", "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "model tiny" in result.output


def test_predict_writes_masks_and_overlays(tmp_path, tiny_checkpoint):
    image = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "case.png")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "case.png"),
            "--modality",
            "fundus",
            "-c",
            str(tiny_checkpoint),
            "--size",
            "64",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(out / "case_mask.png"))
    assert mask.shape == (40, 70) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(out / "case_overlay.png")).shape == (40, 70, 3)


def test_predict_bundled_examples_infers_modality(tmp_path, tiny_checkpoint):
    examples = Path(__file__).parents[1] / "src" / "espmedsam" / "assets" / "examples"
    result = runner.invoke(
        app, ["predict", str(examples), "-c", str(tiny_checkpoint), "--size", "64", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*_mask.png"))) == len(list(examples.glob("*.jpg"))) >= 4
    assert "(ultrasound, file name)" in result.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["predict", "does/not/exist.png"], 2, "no such file"),
        (["info", "--checkpoint", "missing.safetensors"], 4, "missing.safetensors"),
        (["info", "--model", "huge"], 2, "unknown model"),
    ],
)
def test_errors_are_one_line_with_exit_code(args, code, message):
    result = _espmedsam(*args)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_modality_exit_code(tmp_path, tiny_checkpoint):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    result = _espmedsam(
        "predict",
        str(tmp_path / "a.png"),
        "-m",
        "mri",
        "-c",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "unknown modality 'mri'" in result.stderr


def test_import_sam_writes_teacher(tmp_path):
    import torch

    from espmedsam.checkpoints.sam import load_sam_encoder
    from espmedsam.models.sam_vit import SamViTConfig, SamViTEncoder

    encoder = SamViTEncoder(SamViTConfig.tiny())
    torch.save({f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}, tmp_path / "sam.pth")
    result = runner.invoke(
        app, ["import", "sam", str(tmp_path / "sam.pth"), "--out", str(tmp_path / "t.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert load_sam_encoder(tmp_path / "t.safetensors").config == SamViTConfig.tiny()


def test_import_official_into_modality_slot(tmp_path):
    import torch

    sys.path.insert(0, str(Path(__file__).parent / "reference"))
    manifest = pytest.importorskip("manifest")
    try:
        state = manifest.random_official_state_dict()
    except FileNotFoundError:
        pytest.skip("official manifest not available")
    torch.save(state, tmp_path / "official.pth")
    out = tmp_path / "slot.safetensors"
    result = runner.invoke(
        app, ["import", "official", str(tmp_path / "official.pth"), "-m", "fundus", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    from espmedsam import load_model

    model = load_model(out)
    assert model.config.name == "default"
    key = "image_encoder.layers.3.blocks.1.controllers.3.adapter.fc1.weight"
    assert torch.equal(model.state_dict()[key], state["SemiTViT.layers.3.blocks.1.med_dah.fc1.weight"])


def test_predict_and_info_accept_a_unet_baseline_checkpoint(tmp_path):
    from espmedsam.checkpoints.native import save_unet
    from espmedsam.models.unet import UNetBaseline, UNetConfig

    unet = save_unet(UNetBaseline(UNetConfig(features=(4, 4, 8, 8, 16, 4))), tmp_path / "unet.safetensors")
    Image.fromarray(np.zeros((30, 45), dtype=np.uint8)).save(tmp_path / "xray_case.png")
    image = str(tmp_path / "xray_case.png")
    args = ["predict", image, "-c", str(unet), "--size", "64", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "xray_case_mask.png")).shape == (30, 45)
    info = runner.invoke(app, ["info", "-c", str(unet)])
    assert info.exit_code == 0 and "U-Net baseline" in info.output


def test_export_writes_float16_with_input_sizes(tmp_path, tiny_checkpoint):
    out = tmp_path / "ship.safetensors"
    args = ["export", str(tiny_checkpoint), "--out", str(out), "--fp16", "--input-size", "fundus=128"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    from espmedsam import load_model

    assert load_model(out).config.inference_sizes == (64, 64, 64, 128, 64, 64)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as file:
        assert {file.get_tensor(k).dtype for k in file.keys()} >= {torch.float16}
        assert torch.float32 not in {file.get_tensor(k).dtype for k in file.keys()}
    bad = runner.invoke(app, ["export", str(tiny_checkpoint), "--out", str(out), "--input-size", "fundus"])
    assert "MODALITY=SIZE" in str(bad.exception)  # the app prints it as one line, exit code 2


@pytest.mark.parametrize(
    "args, expected",
    [
        (["predict", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
        (["predict", "--no-such-option"], "No such option: --no-such-option"),
        (["data"], "Missing command"),
    ],
)
def test_usage_errors_are_one_line_naming_the_option(args, expected):
    result = _espmedsam(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "--help" in lines[0]


def test_no_command_still_shows_the_help():
    result = _espmedsam()
    assert result.returncode == 2 and "Usage: espmedsam" in result.stdout + result.stderr
