"""Evaluation: a model over dataset folders -> per-image table, summaries and overlays (paper-notes §7).

Two protocols:

- ``"native"`` (ours): the prediction (logit > 0) is scored against the mask at the image's original
  resolution: Dice, IoU, HD95 and NSD at a 2-pixel tolerance.
- ``"paper"`` (the official code's): logits are resized (bilinear) and the mask (nearest) to 1024 x 1024 and
  scored there, with the Hausdorff distance at its 100th percentile (the ``hd95`` column then holds HD100).

The empty-mask rule is the one of ``espmedsam.metrics``: see ``EMPTY_RULE``. Outputs in ``out_dir``:
``per_image.csv``, ``summary.json``, ``summary.md``, ``overlays/<dataset>/<stem>.png`` and, with
``worst`` > 0, ``worst_<dataset>.png``: a montage of each dataset's lowest-Dice images.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from espmedsam.data.dataset import DatasetSource, Sample, SegmentationFolder
from espmedsam.data.io import write_png
from espmedsam.errors import DataError, InputError
from espmedsam.files import make_folder, write_text
from espmedsam.metrics import LOW_DICE, METRIC_NAMES, agreement, dice, segmentation_metrics, summarise
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.predict import Predictor
from espmedsam.visualize import montage, overlay, overlay_tile

if TYPE_CHECKING:
    from espmedsam.models.unet import UNetBaseline

logger = logging.getLogger(__name__)

Protocol = Literal["native", "paper"]
PROTOCOLS: tuple[str, ...] = ("native", "paper")
PAPER_SIZE = 1024  # the official evaluation resizes prediction and mask to 1024 x 1024
NSD_TOLERANCE = 2.0  # pixels
EMPTY_RULE = (
    "both masks empty: Dice = IoU = 1; either mask empty: HD95 and NSD undefined, skipped and counted "
    "in n_skipped"
)
ProgressCallback = Callable[[int, int], None]  # (images done, images in total)
WORST_TILE = 256  # pixels, the long side of a tile in worst_<dataset>.png


@dataclass(frozen=True)
class ImageResult:
    """One row of ``per_image.csv``; height and width are the image's original size."""

    dataset: str
    modality: str
    stem: str
    dice: float
    iou: float
    hd95: float
    nsd: float
    height: int
    width: int
    # the quality score's estimate of the Dice (``models/quality.py``); None (written "") without one
    predicted_dice: float | None = None


@dataclass(frozen=True)
class EvaluationReport:
    """What ``evaluate`` computed and where it wrote it; ``summary`` is the content of summary.json."""

    rows: tuple[ImageResult, ...]
    summary: dict[str, Any]
    out_dir: Path
    failures: tuple[str, ...] = ()  # one line per image that could not be read (naming its file)
    montages: tuple[Path, ...] = ()  # worst_<dataset>.png files, with ``worst`` > 0

    @property
    def per_image_csv(self) -> Path:
        return self.out_dir / "per_image.csv"

    @property
    def summary_json(self) -> Path:
        return self.out_dir / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.out_dir / "summary.md"


def evaluate(
    model_or_predictor: ESPMedSAM | Predictor,
    sources: Sequence[DatasetSource],
    *,
    split: str | None = "test",
    out_dir: str | Path,
    protocol: Protocol = "native",
    overlays: int = 8,
    size: int | None = None,
    checkpoint: str | Path | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    worst: int = 0,
) -> EvaluationReport:
    """Score the model on ``split`` of each dataset folder and write the report to ``out_dir``.

    Args:
        model_or_predictor: a model (run on CPU with bfloat16 autocast) or a configured ``Predictor``.
        sources: dataset folders; their names (``DatasetSource.name``) must be distinct.
        split: "train", "val", "test", or None for every image of the folder.
        out_dir: report folder (created); existing report files are replaced.
        protocol: "native" (original resolution, HD95) or "paper" (1024 x 1024, HD100).
        overlays: overlay pictures written for the first ``overlays`` images of each dataset.
        size: model input side (a multiple of the model's ``size_multiple``); None keeps the predictor's.
        checkpoint: recorded in summary.json as the weights' origin.
        progress: called as ``progress(done, total)`` after each image.
        workers: processes that read and decode images ahead of the model; None: 4 on a GPU, 0 (read
            in the main process) on the CPU, whose cores the model already uses.
        worst: with K > 0, write ``worst_<dataset>.png`` per dataset: its K lowest-Dice images in a grid,
            prediction outlined red and ground truth green, captioned with stem and Dice. Only those K
            are kept in memory while streaming.
    Returns:
        The per-image rows, the summary and the output folder, and a line per image that could not be
        read: it is left out of the scores (and listed under "failed" in summary.json), the others go on.
    Raises:
        InputError: an unknown protocol, a negative ``worst``, no or duplicate dataset names, or a
            dataset whose modality the model does not have. DataError: a folder that is not a dataset
            (missing files of a stem, a malformed split.json), or no image at all to evaluate.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if worst < 0:
        raise InputError(f"worst must be 0 (no montage) or a positive number of images, got {worst}")
    _check_names(sources)
    predictor = _predictor(model_or_predictor, size)
    out_dir = Path(out_dir)
    folders = [SegmentationFolder(source, split=split) for source in sources]
    total, done = sum(len(folder) for folder in folders), 0
    if total == 0:
        where = ", ".join(str(source.root) for source in sources)
        raise DataError(f"no images to evaluate in {where} (split {split or 'all'})")
    rows: list[ImageResult] = []
    failures: list[str] = []
    worst_cases = {source.name: WorstCases(worst) for source in sources}
    if workers is None:
        workers = 4 if predictor.device.type == "cuda" else 0
    for source, folder in zip(sources, folders, strict=True):
        for index, sample in enumerate(read_ahead(folder, workers)):
            if isinstance(sample, Unreadable):
                logger.warning("%s", sample.message)
                failures.append(sample.message)
            else:
                _check_modality(predictor, source, sample)
                row, prediction = _score(predictor, sample, source.name, protocol, out_dir, index < overlays)
                rows.append(row)
                worst_cases[source.name].offer(row.dice, sample.stem, sample.image, prediction, sample.mask)
            done += 1
            if progress is not None:
                progress(done, total)
    _log_skipped(rows)
    summary = summarise_rows(rows, protocol=protocol, split=split, checkpoint=checkpoint)
    summary["failed"] = failures
    make_folder(out_dir)
    write_text(out_dir / "per_image.csv", rows_to_csv(rows))
    write_text(out_dir / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    write_text(out_dir / "summary.md", summary_markdown(summary))
    montages = tuple(
        write_png(out_dir / f"worst_{name}.png", cases.montage())
        for name, cases in worst_cases.items()
        if cases
    )
    return EvaluationReport(tuple(rows), summary, out_dir, tuple(failures), montages)


@dataclass(frozen=True)
class Case:
    """One scored image kept for the worst-case montage, at its original resolution."""

    dice: float
    stem: str
    image: np.ndarray  # (H, W, 3) uint8
    prediction: np.ndarray  # (H, W) bool
    truth: np.ndarray  # (H, W) bool


class WorstCases:
    """The ``k`` lowest-Dice images offered so far, in a bounded heap (memory: ``k`` images at most).

    Ties keep the image offered first. ``k`` = 0 keeps nothing.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, Case]] = []  # (-dice, -order, case): root = best kept
        self._offered = 0

    def __len__(self) -> int:
        return len(self._heap)

    def offer(
        self, dice: float, stem: str, image: np.ndarray, prediction: np.ndarray, truth: np.ndarray
    ) -> None:
        """Keep this image if it is among the ``k`` lowest Dice so far (an undefined Dice is not kept)."""
        if self.k <= 0 or math.isnan(dice):
            return
        self._offered += 1
        key = (-dice, -self._offered)
        if len(self._heap) == self.k and key <= self._heap[0][:2]:
            return
        item = (*key, Case(dice, stem, image, np.asarray(prediction, bool), np.asarray(truth, bool)))
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        else:
            heapq.heapreplace(self._heap, item)

    def cases(self) -> list[Case]:
        """The kept images, lowest Dice first."""
        return [item[2] for item in sorted(self._heap, key=lambda item: item[:2], reverse=True)]

    def montage(self, side: int = WORST_TILE) -> np.ndarray:
        """The kept images as one picture, lowest Dice first: overlay tiles of ``side`` px captioned
        "Dice 0.123  <stem>" (Dice first, so a long stem that is cut does not hide it)."""
        cases = self.cases()
        tiles = [overlay_tile(case.image, case.prediction, case.truth, side) for case in cases]
        captions = [f"Dice {case.dice:.3f}  {case.stem}" for case in cases]
        return montage(tiles, captions=captions)


@dataclass(frozen=True)
class Unreadable:
    """An image (or its mask) that could not be read: the one-line reason, naming the file."""

    message: str


def read_ahead(folder: SegmentationFolder, workers: int) -> Iterator[Sample | Unreadable]:
    """The folder's samples in order, an ``Unreadable`` in place of each that fails to read; with
    ``workers`` > 0 read and decoded in that many processes."""
    guarded = _Guarded(folder)
    if workers <= 0:
        yield from (guarded[index] for index in range(len(guarded)))
        return
    yield from DataLoader(guarded, batch_size=None, num_workers=workers, collate_fn=_as_is)


class _Guarded(torch.utils.data.Dataset):
    """A folder whose unreadable items come out as ``Unreadable``: one bad file must not end the run."""

    def __init__(self, folder: SegmentationFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> Sample | Unreadable:
        try:
            return self.folder[index]
        except DataError as error:
            return Unreadable(str(error))


def _as_is(sample: Sample | Unreadable) -> Sample | Unreadable:
    return sample


def choose_input_sizes(
    model: ESPMedSAM | UNetBaseline,
    sources: Sequence[DatasetSource],
    candidates: Sequence[int],
    *,
    split: str | None = "val",
    progress: ProgressCallback | None = None,
    device: str = "auto",
) -> dict[str, dict[int, float]]:
    """Mean Dice of each modality's ``split`` images at each candidate input size (pick on validation data).

    Returns:
        modality -> {size: mean Dice}; the best size of a modality is ``max(scores, key=scores.get)``.
    """
    folders = [SegmentationFolder(source, split=split) for source in sources]
    total, done = len(candidates) * sum(len(folder) for folder in folders), 0
    predictors = {size: Predictor(model, size=size, device=device) for size in candidates}
    scores: dict[str, dict[int, list[float]]] = {}
    for source, folder in zip(sources, folders, strict=True):
        for index in range(len(folder)):
            sample = folder[index]  # read once, predicted at every candidate size
            _check_modality(predictors[candidates[0]], source, sample)
            for size, predictor in predictors.items():
                score = dice(predictor.predict(sample.image, sample.modality), sample.mask)
                scores.setdefault(sample.modality, {}).setdefault(size, []).append(score)
                done += 1
                if progress is not None:
                    progress(done, total)
    return {m: {size: float(np.mean(v)) for size, v in by_size.items()} for m, by_size in scores.items()}


def score_sample(
    predictor: Predictor, sample: Sample, protocol: Protocol = "native"
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of one sample under ``protocol`` and the (H, W) bool prediction at the original size; with
    a calibrated quality score (``Predictor.has_quality``) the metrics hold its ``predicted_dice``."""
    logits, quality = predictor.predict_logits_with_quality(sample.image, sample.modality)
    prediction = logits > 0
    truth = np.asarray(sample.mask, dtype=bool)
    if protocol == "paper":
        paper_prediction = _resize(logits, PAPER_SIZE, "bilinear") > 0
        paper_truth = _resize(truth, PAPER_SIZE, "nearest") > 0.5
        metrics = segmentation_metrics(
            paper_prediction, paper_truth, tolerance=NSD_TOLERANCE, percentile=100.0
        )
    else:
        metrics = segmentation_metrics(prediction, truth, tolerance=NSD_TOLERANCE, percentile=95.0)
    return {**metrics, "predicted_dice": quality}, prediction


def summarise_rows(
    rows: Sequence[ImageResult],
    *,
    protocol: Protocol = "native",
    split: str | None = "test",
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """The summary.json content: per dataset and per modality (images pooled), and overall.

    "overall" is the mean (and std) over datasets of the dataset means; "overall"["pooled"] pools images.
    Each dataset also has "dice_distribution": median, 10th percentile and low-Dice count (see
    ``dice_distribution``).
    Undefined values (NaN) stay NaN here; the writer turns them into JSON null.
    """
    datasets: dict[str, list[ImageResult]] = {}
    modalities: dict[str, list[ImageResult]] = {}
    for row in rows:
        datasets.setdefault(row.dataset, []).append(row)
        modalities.setdefault(row.modality, []).append(row)
    per_dataset = {
        name: {
            "modality": group[0].modality,
            "n": len(group),
            **_metric_block(group),
            "dice_distribution": dice_distribution([row.dice for row in group]),
            **_quality_block(group),
        }
        for name, group in datasets.items()
    }
    per_modality = {
        name: {
            "n": len(group),
            "datasets": sorted({row.dataset for row in group}),
            "aggregation": "images pooled",
            **_metric_block(group),
        }
        for name, group in modalities.items()
    }
    overall: dict[str, Any] = {"n": len(rows), "n_datasets": len(datasets)}
    overall["aggregation"] = "mean of dataset means"
    for metric in METRIC_NAMES:
        overall[metric] = asdict(summarise([entry[metric]["mean"] for entry in per_dataset.values()]))
    overall["pooled"] = {"aggregation": "images pooled", **_metric_block(rows), **_quality_block(rows)}
    return {
        "protocol": protocol,
        "split": split,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "resolution": f"{PAPER_SIZE}x{PAPER_SIZE}" if protocol == "paper" else "original",
        "hausdorff_percentile": 100.0 if protocol == "paper" else 95.0,
        "nsd_tolerance_px": NSD_TOLERANCE,
        "empty_rule": EMPTY_RULE,
        "datasets": per_dataset,
        "modalities": per_modality,
        "overall": overall,
    }


def dice_distribution(values: Sequence[float], threshold: float = LOW_DICE) -> dict[str, float | int]:
    """Median and 10th percentile (linear interpolation, ``numpy.percentile``) of the finite Dice values,
    and how many lie below ``threshold``; median and p10 are NaN without a finite value.

    Example: ``dice_distribution([0.0, 0.4, 0.8, 1.0])`` gives median 0.6, p10 0.12, n_below 2.
    """
    array = np.asarray(list(values), dtype=np.float64)
    finite = array[~np.isnan(array)]
    if finite.size == 0:
        median = p10 = math.nan
    else:
        median, p10 = float(np.median(finite)), float(np.percentile(finite, 10))
    return {"median": median, "p10": p10, "threshold": threshold, "n_below": int((finite < threshold).sum())}


def rows_to_csv(rows: Sequence[ImageResult]) -> str:
    """per_image.csv text: one row per image, undefined metrics written as ``nan``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([field.name for field in fields(ImageResult)])
    for row in rows:
        writer.writerow([_csv_value(value) for value in asdict(row).values()])
    return buffer.getvalue()


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md text: one mean ± std table per dataset (and one of the datasets' Dice median, 10th
    percentile and low-Dice count) and per modality, then the overall rows."""
    hd = "HD100" if summary["hausdorff_percentile"] == 100.0 else "HD95"
    header = f"| {{}} | n | Dice | IoU | {hd} (px) | NSD@{summary['nsd_tolerance_px']:g}px |"
    lines = [
        f"# Evaluation ({summary['protocol']} protocol, split {summary['split']})",
        "",
        f"Checkpoint: {summary['checkpoint'] or 'not recorded'}; resolution: {summary['resolution']}.",
        f"Empty masks: {summary['empty_rule']}. Values are mean ± std; (k skipped) counts undefined values.",
        "",
        "## Per dataset",
        "",
        header.format("dataset (modality)"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_md_row(f"{name} ({entry['modality']})", entry) for name, entry in summary["datasets"].items()]
    lines += _md_distribution(summary["datasets"])
    lines += [
        "",
        "## Per modality (images pooled)",
        "",
        header.format("modality"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_md_row(name, entry) for name, entry in summary["modalities"].items()]
    overall = summary["overall"]
    lines += ["", "## Overall", "", header.format("aggregation"), "|---|---:|---:|---:|---:|---:|"]
    lines.append(_md_row(f"mean of {overall['n_datasets']} dataset means", overall, n=overall["n_datasets"]))
    lines.append(_md_row("images pooled", overall["pooled"], n=overall["n"]))
    failed = summary.get("failed") or []
    if failed:
        lines += ["", f"## Not scored: {len(failed)} unreadable", "", *(f"- {line}" for line in failed)]
    return "\n".join(lines) + "\n"


def format_mean_std(block: dict[str, Any]) -> str:
    """``0.912 ± 0.054`` (and ``(k skipped)``) for a metric block; ``n/a`` when undefined."""
    mean, std = block.get("mean"), block.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        text = "n/a"
    else:
        text = f"{mean:.3f} ± {std:.3f}" if abs(mean) < 10 else f"{mean:.1f} ± {std:.1f}"
    skipped = block.get("n_skipped", 0)
    return f"{text} ({skipped} skipped)" if skipped else text


def _score(
    predictor: Predictor, sample: Sample, dataset: str, protocol: Protocol, out_dir: Path, draw: bool
) -> tuple[ImageResult, np.ndarray]:
    """The image's row and its (H, W) bool prediction at the original size; its overlay if ``draw``."""
    metrics, prediction = score_sample(predictor, sample, protocol)
    if draw:
        picture = overlay(sample.image, prediction, np.asarray(sample.mask, dtype=bool))
        write_png(out_dir / "overlays" / dataset / f"{sample.stem}.png", picture)
    height, width = prediction.shape
    row = ImageResult(dataset, sample.modality, sample.stem, **metrics, height=height, width=width)
    return row, prediction


def _predictor(model_or_predictor: ESPMedSAM | Predictor, size: int | None) -> Predictor:
    if isinstance(model_or_predictor, Predictor):
        if size is None or size == model_or_predictor.size:
            return model_or_predictor
        p = model_or_predictor
        return Predictor(p.model, device=str(p.device), size=size, bfloat16=p.bfloat16)
    return Predictor(model_or_predictor, size=size)


def _check_names(sources: Sequence[DatasetSource]) -> None:
    if not sources:
        raise InputError("no dataset to evaluate; pass at least one --data DIR[:MODALITY]")
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"dataset names must be distinct; repeated: {', '.join(duplicates)}")


def _check_modality(predictor: Predictor, source: DatasetSource, sample: Sample) -> None:
    names = predictor.model.modalities
    if sample.modality not in names:
        raise InputError(
            f"{source.name}: modality {sample.modality!r} is not one of the model's ({', '.join(names)})"
        )


def _resize(array: np.ndarray, side: int, mode: str) -> np.ndarray:
    """(H, W) array -> (side, side) float32 by ``torch.nn.functional.interpolate``."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=(side, side), mode=mode, **kwargs)[0, 0].numpy()


def _quality_block(rows: Sequence[ImageResult]) -> dict[str, dict[str, float | int]]:
    """How the quality score ranks the rows' Dice ({} without scores): Spearman, the AUROC of flagging
    Dice below ``LOW_DICE``, and the failures."""
    scored = [row for row in rows if row.predicted_dice is not None]
    if not scored:
        return {}
    fit = agreement(
        np.array([r.predicted_dice for r in scored]), np.array([r.dice for r in scored]), LOW_DICE
    )
    return {
        "quality": {"n": fit.images, "spearman": fit.spearman, "auroc": fit.auroc, "failures": fit.failures}
    }


def _metric_block(rows: Sequence[ImageResult]) -> dict[str, dict[str, float | int]]:
    return {metric: asdict(summarise([getattr(row, metric) for row in rows])) for metric in METRIC_NAMES}


def _log_skipped(rows: Sequence[ImageResult]) -> None:
    skipped = sum(math.isnan(row.hd95) for row in rows)
    if skipped:
        logger.warning(
            "%d of %d images have an empty prediction or mask: HD and NSD skipped for them",
            skipped,
            len(rows),
        )


def _md_row(label: str, entry: dict[str, Any], n: int | None = None) -> str:
    cells = [format_mean_std(entry[metric]) for metric in METRIC_NAMES]
    return f"| {label} | {entry['n'] if n is None else n} | " + " | ".join(cells) + " |"


def _md_distribution(datasets: dict[str, Any]) -> list[str]:
    """The "Dice distribution per dataset" section: median, 10th percentile and low-Dice count."""
    entries = {
        name: entry["dice_distribution"] for name, entry in datasets.items() if "dice_distribution" in entry
    }
    if not entries:  # a summary written before these fields existed
        return []
    threshold = next(iter(entries.values()))["threshold"]
    lines = [
        "",
        "### Dice distribution per dataset",
        "",
        f"| dataset | n | median Dice | P10 Dice | < {threshold:g} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, block in entries.items():
        cells = [_md_number(block["median"]), _md_number(block["p10"]), str(block["n_below"])]
        lines.append(f"| {name} | {datasets[name]['n']} | " + " | ".join(cells) + " |")
    return lines


def _md_number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return value


def _json_safe(value: Any) -> Any:
    """NaN -> None (JSON null), recursively; JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value
