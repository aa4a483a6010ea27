from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.cli import app

runner = CliRunner()


def test_train_command_runs_a_config_with_overrides(tiny_config, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_config.to_yaml())
    out = tmp_path / "cli_run"
    args = ["train", "--config", str(path), "--set", "epochs=1", "--set", f"out_dir={out}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output and "best" in result.output
    assert load_model(out / "best.safetensors").config.name == "tiny"
    assert (out / "config.yaml").is_file() and (out / "state.pt").is_file()

    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 2


def test_train_command_with_init(tiny_config, tmp_path):
    from espmedsam import build_model

    start = save_model(build_model("tiny"), tmp_path / "start.safetensors")
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_config.to_yaml())
    out = tmp_path / "init_run"
    args = ["train", "--config", str(path), "--init", str(start), "--set", "epochs=1"]
    assert runner.invoke(app, [*args, "--set", f"out_dir={out}"]).exit_code == 0
    assert (out / "last.safetensors").is_file()
    assert f"init: {start}" in (out / "config.yaml").read_text()


def _espmedsam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "espmedsam", *args], capture_output=True, text=True)


def test_train_config_errors_exit_2_naming_the_key():
    result = _espmedsam("train", "--set", "loss.nope=1")
    assert result.returncode == 2 and result.stderr.startswith("error:")
    assert "unknown config key 'loss.nope'" in result.stderr and "Traceback" not in result.stderr


def test_train_without_data_or_with_missing_init(tmp_path):
    result = _espmedsam("train", "--set", f"out_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "no dataset folders" in result.stderr
    missing = tmp_path / "missing.safetensors"
    result = _espmedsam("train", "--config", "six_datasets_256", "--init", str(missing))
    assert result.returncode == 4 and "missing.safetensors" in result.stderr


def test_train_command_with_a_teacher_on_whole_images(tiny_config, tmp_path):
    from espmedsam import build_model

    teacher = save_model(build_model("tiny"), tmp_path / "teacher.safetensors")
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_config.to_yaml())
    out = tmp_path / "taught"
    args = ["train", "--config", str(path), "--set", "epochs=1", "--set", f"out_dir={out}"]
    result = runner.invoke(app, [*args, "--teacher", str(teacher), "--teacher-focus", "1"])
    assert result.exit_code == 0, result.output
    written = (out / "config.yaml").read_text()
    assert "teacher_weight: 10.0" in written and "teacher_focus: 1.0" in written
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["teacher_loss"] > 0 for r in records if r.get("kind") == "train")


def test_a_teacher_weight_without_a_teacher_is_refused():
    result = _espmedsam("train", "--teacher-weight", "5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --teacher-weight weighs a teacher's term, so it needs --teacher"


def test_a_teacher_focus_without_a_teacher_is_refused():
    result = _espmedsam("train", "--teacher-focus", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --teacher-focus weighs a teacher's term, so it needs --teacher"
