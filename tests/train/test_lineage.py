"""A checkpoint's lineage: the training runs behind its weights."""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

from espmedsam.checkpoints.lineage import lineage_rows, read_lineage
from espmedsam.checkpoints.native import export_checkpoint, load_model
from espmedsam.cli import app
from espmedsam.train import train


def test_continued_runs_extend_the_lineage(tiny_config, tmp_path):
    first = train(dataclasses.replace(tiny_config, name="first", out_dir=str(tmp_path / "a")))
    [run] = read_lineage(first.last_path)
    assert run["run"] == "first" and run["init"] is None and run["steps"] == first.steps
    assert [c[0] for c in run["val_curve"]] == [2, 4]  # validation after each of the 2 epochs
    shipped = export_checkpoint(first.best_path, tmp_path / "shipped.safetensors")
    assert read_lineage(shipped) == read_lineage(first.best_path)  # export keeps it
    second = train(
        dataclasses.replace(tiny_config, name="second", init=str(shipped), out_dir=str(tmp_path / "b"))
    )
    lineage = load_model(second.last_path).lineage
    assert [r["run"] for r in lineage] == ["first", "second"]
    rows = lineage_rows(lineage)
    assert rows[1]["cumulative_minutes"] >= rows[0]["cumulative_minutes"]
    assert rows[1]["gain"] == rows[1]["best_val_dice"] - rows[0]["best_val_dice"]

    result = CliRunner().invoke(
        app, ["history", "-c", str(second.last_path), "--plot", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 0, result.output
    assert "first" in result.output and "second" in result.output
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_checkpoint_without_lineage_has_an_empty_one(tmp_path):
    from espmedsam.checkpoints.native import save_model
    from espmedsam.models.registry import build_model

    path = save_model(build_model("tiny"), tmp_path / "m.safetensors")
    assert read_lineage(path) == [] and load_model(path).lineage == []
    assert read_lineage(tmp_path / "missing.safetensors") == []
