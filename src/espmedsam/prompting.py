"""Box and click prompts on top of the prompt-free output: parsing, checking and mapping to the model input.

Coordinates are the original image's pixels: x to the right, y down, (0, 0) the top-left pixel's centre.
A prompt goes through the model's promptable decoder (``models/prompt_decoder.py``) in passes, SAM's way
of one object per prompt:

- each box is one pass, with the points that fall inside it;
- the points inside no box make one pass of their own;
- the mask is the union of the passes' masks.

A prompt file for ``espmedsam predict FOLDER --prompts FILE`` is CSV with the header
``image,kind,x0,y0,x1,y1,label``, one prompt per row: a ``box`` row gives both corners, a ``point`` row its
x, y in ``x0, y0`` and ``label`` 1 (foreground, the default) or 0 (background). Or JSON:
``{"image.png": {"boxes": [[x0, y0, x1, y1]], "points": [[x, y]], "labels": [1]}}``. ``image`` is the
file's name, as ``predictions.csv`` gives it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from espmedsam.errors import InputError
from espmedsam.models.image_io import PreprocessMeta
from espmedsam.models.prompt import BACKGROUND, FOREGROUND


@dataclass(frozen=True)
class Prompts:
    """Boxes (x0, y0, x1, y1) and points (x, y) with labels (1 foreground, 0 background), in original
    pixels."""

    boxes: tuple[tuple[float, float, float, float], ...] = ()
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.boxes or self.points)

    @classmethod
    def of(cls, boxes=None, points=None, labels=None) -> Prompts:
        """From array-likes: boxes (K, 4), points (P, 2), labels (P,) (default: all foreground).

        Raises:
            InputError: wrong shapes, non-finite values, labels other than 0 and 1, or a box whose second
                corner is left of or above its first.
        """
        box_array = _array(boxes, 4, "boxes")
        point_array = _array(points, 2, "points")
        if labels is None:
            label_list = [FOREGROUND] * len(point_array)
        else:
            label_list = [int(v) for v in np.asarray(labels).reshape(-1)]
        if len(label_list) != len(point_array):
            raise InputError(f"{len(point_array)} points but {len(label_list)} labels")
        if any(v not in (FOREGROUND, BACKGROUND) for v in label_list):
            raise InputError(f"point labels must be 1 (foreground) or 0 (background), got {label_list}")
        for x0, y0, x1, y1 in box_array:
            if not (x1 >= x0 and y1 >= y0):  # corners inclusive: a one-pixel box is (x, y, x, y)
                raise InputError(f"box {_fmt((x0, y0, x1, y1))}: x1 must not be left of x0, nor y1 above y0")
        return cls(
            tuple(tuple(map(float, b)) for b in box_array),  # type: ignore[misc]
            tuple(tuple(map(float, p)) for p in point_array),  # type: ignore[misc]
            tuple(label_list),
        )

    def check_inside(self, height: int, width: int) -> None:
        """Raises InputError for a box or point outside the (height, width) image."""
        for box in self.boxes:
            x0, y0, x1, y1 = box
            if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
                raise InputError(f"box {_fmt(box)} is outside the {width}x{height} image")
        for point in self.points:
            x, y = point
            if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                raise InputError(f"point {_fmt(point)} is outside the {width}x{height} image")


@dataclass(frozen=True)
class PromptPass:
    """One decoder pass: at most one box, and points with labels, in original pixels."""

    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()


def prompt_passes(prompts: Prompts) -> list[PromptPass]:
    """Each box with the points inside it, then the points inside no box (see the module docstring)."""
    passes, claimed = [], set()
    for box in prompts.boxes:
        inside = [i for i, p in enumerate(prompts.points) if _inside(p, box)]
        claimed.update(inside)
        points, labels = (tuple(values[i] for i in inside) for values in (prompts.points, prompts.labels))
        passes.append(PromptPass(box, points, labels))
    rest = [i for i in range(len(prompts.points)) if i not in claimed]
    if rest:
        passes.append(
            PromptPass(None, tuple(prompts.points[i] for i in rest), tuple(prompts.labels[i] for i in rest))
        )
    return passes


@dataclass(frozen=True)
class ModelPrompt:
    """One pass's prompt as ``ESPMedSAM.decode_prompt`` takes it (a batch of one), in model-input pixels."""

    points: torch.Tensor | None  # (1, P, 2)
    labels: torch.Tensor | None  # (1, P)
    boxes: torch.Tensor | None  # (1, 4)


def to_model_input(prompt: PromptPass, meta: PreprocessMeta) -> ModelPrompt:
    """Original pixels -> model-input pixels: pixel centres scaled as the image was resized (its long side
    to S, per axis exactly as ``preprocess`` rounded it); the padding is right and below, so nothing
    shifts."""
    (h, w), (rh, rw) = meta.original_size, meta.resized_size
    scale = torch.tensor([rw / w, rh / h], dtype=torch.float32)

    def mapped(xy: torch.Tensor) -> torch.Tensor:  # (..., 2) pixel centres -> the resized image's
        return (xy + 0.5) * scale - 0.5

    points = labels = boxes = None
    if prompt.points:
        points = mapped(torch.tensor(prompt.points, dtype=torch.float32))[None]
        labels = torch.tensor(prompt.labels, dtype=torch.int64)[None]
    if prompt.box is not None:
        boxes = mapped(torch.tensor(prompt.box, dtype=torch.float32).view(2, 2)).view(1, 4)
    return ModelPrompt(points, labels, boxes)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` -> the box. Raises InputError when malformed."""
    values = _numbers(text, "--box", "x0,y0,x1,y1")
    if len(values) != 4:
        raise InputError(f"--box {text!r}: expected x0,y0,x1,y1")
    return values[0], values[1], values[2], values[3]


def parse_point(text: str) -> tuple[float, float, int]:
    """``x,y`` or ``x,y,label`` (1 foreground, the default; 0 background) -> (x, y, label).

    Raises:
        InputError: malformed, or a label other than 0 and 1.
    """
    values = _numbers(text, "--point", "x,y[,0|1]")
    if len(values) not in (2, 3):
        raise InputError(f"--point {text!r}: expected x,y or x,y,label")
    label = values[2] if len(values) == 3 else FOREGROUND
    if label not in (FOREGROUND, BACKGROUND):
        raise InputError(f"--point {text!r}: the label must be 1 (foreground) or 0 (background)")
    return values[0], values[1], int(label)


def prompts_from_options(boxes: list[str] | None, points: list[str] | None) -> Prompts:
    """The CLI's repeatable ``--box`` and ``--point`` options -> Prompts. Raises InputError."""
    parsed = [parse_point(p) for p in points or []]
    return Prompts.of(
        [parse_box(b) for b in boxes or []], [(x, y) for x, y, _ in parsed], [lab for _, _, lab in parsed]
    )


@dataclass
class _Collected:
    boxes: list = field(default_factory=list)
    points: list = field(default_factory=list)
    labels: list = field(default_factory=list)


def read_prompt_file(path: Path) -> dict[str, Prompts]:
    """A CSV or JSON prompt file (module docstring) -> image file name -> Prompts.

    Raises:
        InputError: unreadable, malformed, or an unknown kind.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the prompt file ({error})") from None
    collected = _read_json(text, path) if Path(path).suffix.lower() == ".json" else _read_csv(text, path)
    return {name: Prompts.of(c.boxes, c.points, c.labels) for name, c in collected.items()}


def _read_json(text: str, path: Path) -> dict[str, _Collected]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object of image name -> prompts")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not set(entry) <= {"boxes", "points", "labels"}:
            raise InputError(f"{path}: {name}: expected {{'boxes': [...], 'points': [...], 'labels': [...]}}")
        points = entry.get("points", [])
        labels = entry.get("labels", [FOREGROUND] * len(points))
        out[str(name)] = _Collected(list(entry.get("boxes", [])), list(points), list(labels))
    return out


def _read_csv(text: str, path: Path) -> dict[str, _Collected]:
    rows = list(csv.DictReader(text.splitlines()))
    out: dict[str, _Collected] = {}
    for line, row in enumerate(rows, start=2):
        name, kind = (row.get("image") or "").strip(), (row.get("kind") or "").strip().lower()
        if not name:
            raise InputError(f"{path}, line {line}: no image name")
        collected = out.setdefault(name, _Collected())
        try:
            if kind == "box":
                collected.boxes.append([float(row[k]) for k in ("x0", "y0", "x1", "y1")])
            elif kind == "point":
                collected.points.append([float(row["x0"]), float(row["y0"])])  # type: ignore[arg-type]
                collected.labels.append(int(float(row.get("label") or FOREGROUND)))
            else:
                raise InputError(f"{path}, line {line}: kind must be box or point, got {kind!r}")
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}, line {line}: missing or non-numeric coordinates") from None
    return out


def _inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _array(values, width: int, name: str) -> np.ndarray:
    if values is None:
        return np.zeros((0, width))
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers") from None
    if array.size == 0:
        return np.zeros((0, width))
    array = array.reshape(1, -1) if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != width:
        raise InputError(f"{name} must be ({'K' if width == 4 else 'P'}, {width}), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{name} must be finite numbers")
    return array


def _numbers(text: str, option: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected {form}, numbers separated by commas") from None
    if not all(np.isfinite(values)):
        raise InputError(f"{option} {text!r}: the numbers must be finite")
    return values


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
