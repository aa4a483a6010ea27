"""Training history: one JSON record per line in ``log.jsonl``, and ``curves.png`` (loss and val Dice).

Records have a ``kind``: ``"train"`` (step, epoch, loss parts, lr, images/s) or ``"val"`` (step, epoch,
Dice per dataset, their mean). The plot needs matplotlib (``pip install 'espmedsam[plot]'``); without it
the plot is skipped with one log line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from espmedsam.files import atomic_write, write_text

logger = logging.getLogger(__name__)


class History:
    """The records of a run, mirrored to a JSONL file.

    Args:
        path: the JSONL file.
        resume_step: when resuming, the records up to this step are kept and later ones (written after
            the checkpoint being resumed) dropped; None starts a new file.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            records = _parse_lines(self.path.read_text())
            self.records = [r for r in records if r.get("step", 0) <= resume_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._warned = False

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def plot(self, path: str | Path) -> Path | None:
        """Write the curves to ``path`` (PNG); None when matplotlib is missing or nothing is logged yet."""
        if importlib.util.find_spec("matplotlib") is None:
            if not self._warned:
                logger.info("matplotlib not installed; skipping %s (pip install 'espmedsam[plot]')", path)
                self._warned = True
            return None
        train = [r for r in self.records if r["kind"] == "train"]
        val = [r for r in self.records if r["kind"] == "val"]
        if not train and not val:
            return None
        return atomic_write(path, lambda file: _figure(train, val).savefig(file, format="png", dpi=100))


def _parse_lines(text: str) -> list[dict[str, Any]]:
    """The records of a JSONL text, less a last line cut short by a killed process."""
    records = []
    for line in filter(str.strip, text.splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("dropped a truncated log line: %.60s", line)
    return records


def _figure(train: list[dict[str, Any]], val: list[dict[str, Any]]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas, without touching pyplot's global backend
    loss_axes, dice_axes = figure.subplots(1, 2)
    steps = [r["step"] for r in train]
    for key in ("loss", "dice_loss", "focal_loss", "patch_loss", "teacher_loss"):
        if train and key in train[0]:
            loss_axes.plot(steps, [r[key] for r in train], label=key, linewidth=1)
    loss_axes.set(xlabel="step", ylabel="training loss", title="loss")
    if train:
        loss_axes.legend(fontsize="small")
    val_steps = [r["step"] for r in val]
    if val:
        for name in val[-1]["val_dice"]:
            dice = [r["val_dice"].get(name, float("nan")) for r in val]
            dice_axes.plot(val_steps, dice, label=name, linewidth=1, marker=".")
        mean = [r["val_mean_dice"] for r in val]
        dice_axes.plot(val_steps, mean, label="mean", color="black", linewidth=2, marker="o")
        dice_axes.legend(fontsize="small")
    dice_axes.set(xlabel="step", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    return figure
