"""A checkpoint's lineage: the training runs behind its weights, oldest first, stored in its metadata.

Every run of ``espmedsam train`` adds its record to the lineage of the checkpoint it started from
(``init``), so weights continued over several runs (``init: bundled``) carry their whole history:
per run its recipe name, where it started, its minutes (setup, such as cache building, and training),
steps, and the mean validation Dice at each validation, at the cumulative training minutes of the
lineage. ``espmedsam history CKPT`` prints it and plots the validation curve over every run.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from espmedsam.files import atomic_write

LINEAGE_KEY = "lineage"  # the safetensors metadata key


def run_record(
    name: str,
    init: str | None,
    records: Sequence[dict[str, Any]],
    *,
    steps: int,
    train_s: float,
    setup_s: float,
) -> dict[str, Any]:
    """One run's lineage entry from its history records (``train.history``; val records with
    ``elapsed_s``)."""
    val = [r for r in records if r.get("kind") == "val"]
    curve = [[r["step"], round(r.get("elapsed_s", 0.0) / 60, 2), round(r["val_mean_dice"], 4)] for r in val]
    best = max(val, key=lambda r: r["val_mean_dice"], default=None)
    return {
        "run": name,
        "init": init,
        "steps": steps,
        "setup_minutes": round(setup_s / 60, 1),
        "train_minutes": round(train_s / 60, 1),
        "val_sets": sorted(val[-1]["val_dice"]) if val else [],
        "best_step": best["step"] if best else None,
        "best_val_dice": round(best["val_mean_dice"], 4) if best else None,
        "last_val_dice": {k: round(v, 4) for k, v in val[-1]["val_dice"].items()} if val else {},
        "val_curve": curve,  # [step, training minutes into this run, mean validation Dice]
    }


def read_lineage(path: str | Path) -> list[dict[str, Any]]:
    """The lineage stored in a checkpoint's metadata ([] when it has none or cannot be read)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            text = (file.metadata() or {}).get(LINEAGE_KEY)
    except (SafetensorError, OSError):
        return []
    try:
        lineage = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return lineage if isinstance(lineage, list) else []


def lineage_rows(lineage: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: its name, minutes, cumulative minutes, steps, best validation Dice and ``gain``, its gain
    over the previous run: of the best mean Dice when both validated the same sets, else of the mean of
    the last validation over the sets both have (``gain_sets`` counts them; None for the first run)."""
    rows, total, previous = [], 0.0, None
    for run in lineage:
        minutes = run.get("setup_minutes", 0.0) + run.get("train_minutes", 0.0)
        total += minutes
        gain, sets = _gain(previous, run) if previous is not None else (None, 0)
        rows.append(
            {**run, "minutes": round(minutes, 1), "cumulative_minutes": round(total, 1), "gain": gain}
            | {"gain_sets": sets}
        )
        previous = run
    return rows


def _gain(previous: dict[str, Any], run: dict[str, Any]) -> tuple[float | None, int]:
    if previous.get("val_sets") == run.get("val_sets") and run.get("best_val_dice") is not None:
        return run["best_val_dice"] - previous["best_val_dice"], len(run["val_sets"])
    before, after = previous.get("last_val_dice", {}), run.get("last_val_dice", {})
    common = sorted(set(before) & set(after))
    if not common:
        return None, 0
    return sum(after[k] - before[k] for k in common) / len(common), len(common)


def plot_lineage(lineage: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Mean validation Dice against cumulative minutes over every run (PNG); None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    start = 0.0
    for run in lineage_rows(lineage):
        offset = start + run.get("setup_minutes", 0.0)
        curve = run.get("val_curve") or []
        label = f"{run['run']} ({len(run.get('val_sets', []))} val sets)"
        if curve:
            axes.plot([offset + c[1] for c in curve], [c[2] for c in curve], marker=".", label=label)
        elif run.get("best_val_dice") is not None:  # a run recorded by its best figure alone
            axes.plot([run["cumulative_minutes"]], [run["best_val_dice"]], marker="o", label=label)
        axes.axvline(run["cumulative_minutes"], color="grey", linewidth=0.5)
        start = run["cumulative_minutes"]
    axes.set(xlabel="cumulative minutes (setup + training)", ylabel="mean validation Dice")
    axes.set_title("validation Dice over the weights' training runs")
    axes.legend(fontsize="small")
    return atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
