"""Prediction on files: images (multi-page ones as stacks), DICOM files and series, NIfTI volumes; what
``espmedsam predict`` runs.

Files are read ahead and outputs written in background threads while the model works on the next
batch; 2D images of one input size share a batch. A file that fails is reported and the others go on.
Outputs follow the input (see ``espmedsam.data.stack.write_masks``), with an overlay per 2D image, a
montage of slices per volume or page stack, and one ``predictions.csv`` row per input.
"""

from __future__ import annotations

import csv
import glob
import io
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from espmedsam.data.io import PAGE_SUFFIXES, write_png
from espmedsam.data.stack import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    DicomSeries,
    ImageStack,
    is_dicom_file,
    read_stack,
    write_masks,
)
from espmedsam.errors import EspMedSAMError, InputError
from espmedsam.files import write_text
from espmedsam.predict import Predictor
from espmedsam.prompting import Prompts
from espmedsam.visualize import montage, overlay

VOLUME_SUFFIXES = NIFTI_SUFFIXES + DICOM_SUFFIXES
CSV_COLUMNS = (
    "file",
    "series",
    "page",
    "modality",
    "probability",
    "chosen_by",
    "known",
    "distance",
    "prompt_passes",
    "predicted_iou",
    "predicted_dice",
    "review",
    "frames",
    "foreground_pixels",
    "foreground_mm2",
    "seconds",
    "outputs",
    "error",
)


@dataclass(frozen=True)
class PredictOptions:
    """How files are predicted.

    ``modality``: a model modality for every file, or "auto": a file-name prefix (``xray_case1.png``),
    else the model's classifier. ``min_confidence``: classifier probabilities below it are flagged.
    ``skip_unknown``: write no mask for a file the classifier finds unlike every modality (it is
    segmented otherwise, and flagged; a modality given by option or file name is never checked).
    ``dicom_format``: "nifti" or "seg" (DICOM-SEG). ``axis``: NIfTI volumes are cut along it. ``page``:
    segment that page (0-based) of each image as a 2D image, not all of a multi-page one. ``prompts``:
    file name -> boxes and clicks for that 2D image (``espmedsam.prompting``), decoded by the promptable
    decoder instead of the prompt-free path. ``csv_name``: the table's file name in the output folder
    (one part of a spread run writes its own, ``espmedsam.parts``).
    """

    modality: str = "auto"
    min_confidence: float = 0.6
    skip_unknown: bool = False
    axis: int = 2
    page: int | None = None
    dicom_format: str = "nifti"
    overlays: bool = True
    read_ahead: int = 8
    writers: int = 2
    prompts: Mapping[str, Prompts] | None = None
    csv_name: str = "predictions.csv"


@dataclass(frozen=True)
class FileResult:
    """What happened to one input (``error`` set when it failed). ``series``: a DICOM input's
    SeriesInstanceUID; ``page``: the page segmented alone; ``frames``: slices or pages segmented."""

    source: Path
    series: str = ""
    page: int | None = None
    modality: str = ""
    probability: float | None = None  # the classifier's, when it chose the modality
    chosen_by: str = ""  # "option", "file name" or "classifier"
    frames: int = 0
    foreground_pixels: int = 0
    foreground_mm2: float | None = None
    seconds: float = 0.0
    outputs: tuple[Path, ...] = ()
    error: str | None = None
    low_confidence: bool = False
    known: bool | None = (
        None  # the classifier's verdict; None: not checked (option, file name, no statistics)
    )
    distance: float | None = None  # to the closest modality's statistics, when checked
    skipped: bool = False  # unknown under ``skip_unknown``: no mask written
    prompt_passes: int = 0  # promptable-decoder passes (boxes and click groups); 0: prompt-free
    predicted_iou: float | None = None  # the IoU head's estimate (the lowest of the passes'), when prompted
    # the quality score of a prompt-free 2D mask (``models/quality.py``) and whether it is below the
    # checkpoint's review threshold; None: no calibrated score, a volume or stack, or prompted
    predicted_dice: float | None = None
    review: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def csv_row(self) -> dict[str, object]:
        return {
            "file": str(self.source),
            "series": self.series,
            "page": "" if self.page is None else self.page,
            "modality": self.modality,
            "probability": "" if self.probability is None else f"{self.probability:.4f}",
            "chosen_by": self.chosen_by,
            "known": "" if self.known is None else "yes" if self.known else "no",
            "distance": "" if self.distance is None else f"{self.distance:.3f}",
            "prompt_passes": self.prompt_passes,
            "predicted_iou": "" if self.predicted_iou is None else f"{self.predicted_iou:.4f}",
            "predicted_dice": "" if self.predicted_dice is None else f"{self.predicted_dice:.4f}",
            "review": "" if self.review is None else "yes" if self.review else "no",
            "frames": self.frames,
            "foreground_pixels": self.foreground_pixels,
            "foreground_mm2": "" if self.foreground_mm2 is None else f"{self.foreground_mm2:.2f}",
            "seconds": f"{self.seconds:.3f}",
            "outputs": ";".join(str(p) for p in self.outputs),
            "error": self.error or "",
        }


@dataclass
class _Job:
    """One read file on its way through the model."""

    stack: ImageStack
    seconds: float  # spent on this file so far
    modality: str = ""
    probability: float | None = None
    chosen_by: str = ""
    known: bool | None = None
    distance: float | None = None
    masks: np.ndarray | None = field(default=None, repr=False)
    prompt_passes: int = 0
    predicted_iou: float | None = None
    predicted_dice: float | None = None
    review: bool | None = None


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path | DicomSeries]:
    """Files, folders and glob patterns -> inputs: images, NIfTI and DICOM files, DICOM series folders.

    A folder holding DICOM files is one series, or when its files belong to several series
    (SeriesInstanceUID), one input per series (``espmedsam.data.series.list_series``); another folder
    gives its images, NIfTI and DICOM files (sorted) and its DICOM sub-folders, split the same way.

    Raises:
        InputError: an input that matches nothing, a broken symbolic link, a folder with nothing to
            predict in it, or no input at all.
    """
    paths: list[Path | DicomSeries] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _folder_inputs(path)
            if not found:
                raise InputError(f"{item}: a folder with no images, NIfTI or DICOM files in it")
            paths += found
        elif path.exists():
            paths.append(path)
        elif path.is_symlink():
            raise InputError(f"{item}: broken symbolic link (its target {path.readlink()} does not exist)")
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            if not matches:
                raise InputError(f"{item}: no such file, folder or glob match")
            paths += [p for p in matches if p.is_file()]
    if not paths:
        raise InputError(f"no input images found in {', '.join(str(i) for i in inputs)}")
    return paths


def _folder_inputs(folder: Path) -> list[Path | DicomSeries]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    if any(is_dicom_file(p) for p in files) and not any(_suffix(p) in PAGE_SUFFIXES for p in files):
        return _series_inputs(folder)
    found = [p for p in files if _suffix(p) in PAGE_SUFFIXES + VOLUME_SUFFIXES or is_dicom_file(p)]
    # a broken link named like an input is one the user meant: it fails as such rather than vanish
    broken = [p for p in entries if p.is_symlink() and not p.exists()]
    found = sorted(found + [p for p in broken if _suffix(p) in PAGE_SUFFIXES + VOLUME_SUFFIXES])
    subfolders = [p for p in entries if p.is_dir()]
    series = [d for d in subfolders if any(is_dicom_file(p) for p in d.iterdir() if p.is_file())]
    return [*found, *(item for d in series for item in _series_inputs(d))]


def _series_inputs(folder: Path) -> list[Path | DicomSeries]:
    """A DICOM folder as one input, or one per series when it holds several (``series.list_series``)."""
    try:
        from espmedsam.data.series import list_series
    except ModuleNotFoundError:
        return [folder]  # reading it says what to install
    return list_series(folder)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def modality_from_name(path: Path, names: Sequence[str]) -> str | None:
    """The modality a file name starts with (``xray_case1.png`` -> ``xray``), if any."""
    prefix = path.stem.split("_")[0].lower()
    return prefix if prefix in names else None


def predict_files(
    predictor: Predictor,
    paths: Sequence[Path | DicomSeries],
    out_dir: str | Path,
    options: PredictOptions = PredictOptions(),
) -> Iterator[FileResult]:
    """Predict every input (a file, a DICOM series folder, a ``DicomSeries``) and write its outputs to
    ``out_dir``; yields one ``FileResult`` per input as it finishes, failures included (``error`` set).
    Writes ``predictions.csv`` (``options.csv_name``) at the end.

    Raises:
        InputError: an unknown ``options.modality`` or ``options.dicom_format``, a negative ``options.page``.
    """
    _check_options(predictor, options)
    out_dir = Path(out_dir)
    results: list[FileResult] = []
    with ThreadPoolExecutor(max(1, options.writers), thread_name_prefix="write") as writer:
        writes: deque[Future[FileResult]] = deque()
        for item in _segmented(predictor, _read_ahead(paths, options), options):
            if isinstance(item, FileResult):
                results.append(item)
                yield item
                continue
            writes.append(writer.submit(_write_outputs, item, out_dir, options))
            while writes and (writes[0].done() or len(writes) > 2 * options.writers):
                results.append(writes.popleft().result())
                yield results[-1]
        while writes:
            results.append(writes.popleft().result())
            yield results[-1]
    write_csv(out_dir / options.csv_name, results)


def _check_options(predictor: Predictor, options: PredictOptions) -> None:
    check_modality_option(predictor, options.modality)
    if options.dicom_format not in ("nifti", "seg"):
        raise InputError(f"DICOM output must be nifti or seg, got {options.dicom_format!r}")
    if options.axis not in (0, 1, 2):
        raise InputError(f"NIfTI slicing axis must be 0, 1 or 2, got {options.axis}")
    if options.page is not None and options.page < 0:
        raise InputError(f"--page must be 0 or more (0 is the first page), got {options.page}")


def _read_ahead(paths: Sequence[Path | DicomSeries], options: PredictOptions) -> Iterator[_Job | FileResult]:
    """Read files in a background thread, at most ``options.read_ahead`` ahead of the model."""

    def read(path: Path | DicomSeries) -> _Job | FileResult:
        start = time.perf_counter()
        try:
            return _Job(read_stack(path, axis=options.axis, page=options.page), time.perf_counter() - start)
        except EspMedSAMError as error:
            return _read_failure(path, str(error))
        except Exception as error:  # an unexpected decoder failure must not stop the other files
            return _read_failure(path, f"cannot read ({type(error).__name__}: {error})")

    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader:
        window: deque[Future[_Job | FileResult]] = deque()
        for path in paths:
            window.append(reader.submit(read, path))
            if len(window) > options.read_ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _segmented(
    predictor: Predictor, items: Iterable[_Job | FileResult], options: PredictOptions
) -> Iterator[_Job | FileResult]:
    """Jobs with their masks (volumes alone, 2D images in batches); failures pass through."""
    batch: list[_Job] = []
    for item in items:
        if isinstance(item, FileResult):
            yield item
        elif item.stack.is_volume:
            yield from _run(predictor, [item], options)
        else:
            batch.append(item)
            if len(batch) >= predictor.batch_size:
                yield from _run(predictor, batch, options)
                batch = []
    yield from _run(predictor, batch, options)


def _run(predictor: Predictor, jobs: list[_Job], options: PredictOptions) -> Iterator[_Job | FileResult]:
    """Choose the modality of each job, then segment them together; a failing batch is retried file by
    file, so one bad file fails alone."""
    if not jobs:
        return
    start = time.perf_counter()
    try:
        for job in jobs:
            _choose_modality(predictor, job, options)
        skip = [options.skip_unknown and job.known is False for job in jobs]
        prompts = [_prompts_of(job, options) for job in jobs]
        kept = [job for job, s, p in zip(jobs, skip, prompts, strict=True) if not s and not p]
        frames = [frame for job in kept for frame in job.stack.frames]
        names = [job.modality for job in kept for _ in job.stack.frames]
        # 2D images get the quality score; a volume's or stack's slices do not (a slice without the
        # structure is no failure)
        scored = [len(job.stack.frames) == 1 for job in kept for _ in job.stack.frames]
        results = predictor.predict_with_quality(frames, names, scored) if kept else []
    except Exception as error:
        if len(jobs) > 1:
            for job in jobs:
                yield from _run(predictor, [job], options)
            return
        yield _failure(jobs[0], error)
        return
    share = (time.perf_counter() - start) / len(jobs)
    done = 0
    for job, skipped, prompt in zip(jobs, skip, prompts, strict=True):
        if skipped:
            yield _skipped(job, job.seconds + share)
            continue
        if prompt:
            yield _prompted(predictor, job, prompt)
            continue
        count = len(job.stack.frames)
        mine = results[done : done + count]
        job.masks, job.seconds = np.stack([r.mask for r in mine]), job.seconds + share
        job.predicted_dice = mine[0].quality if count == 1 else None
        job.review = None if job.predicted_dice is None else job.predicted_dice < predictor.review_below
        done += count
        yield job


def _prompts_of(job: _Job, options: PredictOptions) -> Prompts | None:
    return options.prompts.get(job.stack.source.name) if options.prompts else None


def _prompted(predictor: Predictor, job: _Job, prompts: Prompts) -> _Job | FileResult:
    """The job with the mask of its prompts (one encoder pass, one decoder pass per box or click group),
    or its failure."""
    start = time.perf_counter()
    try:
        if len(job.stack.frames) != 1:
            raise InputError(
                f"{job.stack.source.name}: prompts apply to 2D images, and it has {len(job.stack.frames)} "
                "slices or pages (segment one with --page N)"
            )
        result = predictor.predict_prompted(job.stack.frames[0], job.modality, prompts)
    except Exception as error:
        return _failure(job, error)
    job.masks, job.seconds = result.mask[None], job.seconds + time.perf_counter() - start
    job.prompt_passes, job.predicted_iou = len(result.iou), min(result.iou)
    return job


def _choose_modality(predictor: Predictor, job: _Job, options: PredictOptions) -> None:
    choice = choose_modality(predictor, job.stack, options.modality)
    job.modality, job.probability, job.chosen_by = choice.modality, choice.probability, choice.chosen_by
    job.known, job.distance = choice.known, choice.distance


def _skipped(job: _Job, seconds: float) -> FileResult:
    """The row of a file left unsegmented: unknown under ``skip_unknown``."""
    return FileResult(**_job_fields(job), seconds=seconds, known=False, distance=job.distance, skipped=True)


def _job_fields(job: _Job) -> dict:
    """The ``FileResult`` fields every row of a read file has: what it is and how its modality was chosen."""
    stack = job.stack
    return {
        "source": stack.source,
        "series": _series_uid(stack),
        "page": stack.page,
        "modality": job.modality,
        "probability": job.probability,
        "chosen_by": job.chosen_by,
    }


def check_modality_option(predictor: Predictor, requested: str) -> None:
    """Raises InputError unless ``requested`` is "auto" or one of the model's modalities."""
    if requested != "auto" and requested not in predictor.modalities:
        names = ", ".join(predictor.modalities)
        raise InputError(f"unknown modality {requested!r}; expected auto or one of {names}")


@dataclass(frozen=True)
class ModalityChoice:
    """The modality a file is segmented as, and who chose it ("option", "file name" or "classifier");
    when the classifier chose with feature statistics, whether the file looks like any modality."""

    modality: str
    chosen_by: str
    probability: float | None = None  # the classifier's, when it chose
    probabilities: dict[str, float] | None = None  # every modality's, when the classifier chose
    known: bool | None = None  # None: not checked
    distance: float | None = None  # to the closest modality's statistics, when checked


def choose_modality(predictor: Predictor, stack: ImageStack, requested: str = "auto") -> ModalityChoice:
    """``requested`` when it is a modality name, else a file-name prefix, else the classifier (on up to 3
    slices of a volume).

    Raises:
        InputError: no way to tell.
    """
    if requested != "auto":
        return ModalityChoice(requested, "option")
    named = modality_from_name(stack.source, predictor.modalities)
    if named:
        return ModalityChoice(named, "file name")
    if not predictor.has_classifier:
        names = ", ".join(predictor.modalities)
        raise InputError(
            f"{stack.source}: cannot tell its modality (no classifier); pass --modality ({names})"
        )
    frames = stack.frames
    picked = sorted({len(frames) // 4, len(frames) // 2, (3 * len(frames)) // 4})
    guess = predictor.classify([frames[i] for i in picked])
    checked = guess.distance is not None
    return ModalityChoice(
        guess.modality,
        "classifier",
        guess.probability,
        guess.probabilities,
        known=guess.known if checked else None,
        distance=guess.distance,
    )


def _read_failure(path: Path | DicomSeries, message: str) -> FileResult:
    if isinstance(path, DicomSeries):
        return FileResult(path.folder, series=path.uid, error=_about(path, message))
    return FileResult(path, error=_about(path, message))


def _failure(job: _Job, error: Exception) -> FileResult:
    message = str(error) if isinstance(error, EspMedSAMError) else f"{type(error).__name__}: {error}"
    stack = job.stack
    where = stack.series or stack.source
    return FileResult(stack.source, _series_uid(stack), stack.page, error=_about(where, message))


def _series_uid(stack: ImageStack) -> str:
    """A DICOM stack's SeriesInstanceUID ("" for other inputs, or none in the header)."""
    if stack.series is not None:
        return stack.series.uid
    if stack.kind != "dicom" or not stack.reference:
        return ""
    return str(stack.reference[0].get("SeriesInstanceUID", ""))


def _about(path: Path | DicomSeries, message: str) -> str:
    """``message`` as one line that names ``path``."""
    message = " ".join(message.split())
    return message if str(path) in message else f"{path}: {message}"


def _write_outputs(job: _Job, out_dir: Path, options: PredictOptions) -> FileResult:
    """Masks in the input's format, the overlay or montage; the file's ``FileResult``."""
    start = time.perf_counter()
    stack, masks = job.stack, job.masks
    assert masks is not None
    try:
        outputs = list(write_masks(stack, masks, out_dir, dicom_format=options.dicom_format))
        if options.overlays:
            outputs.append(_write_picture(stack, masks, out_dir))
    except Exception as error:
        return _failure(job, error)
    pixels = int(masks.sum())
    spacing = stack.spacing
    return FileResult(
        **_job_fields(job),
        frames=len(masks),
        foreground_pixels=pixels,
        foreground_mm2=None if spacing is None else pixels * spacing[0] * spacing[1],
        seconds=job.seconds + time.perf_counter() - start,
        outputs=tuple(outputs),
        low_confidence=job.probability is not None and job.probability < options.min_confidence,
        known=job.known,
        distance=job.distance,
        prompt_passes=job.prompt_passes,
        predicted_iou=job.predicted_iou,
        predicted_dice=job.predicted_dice,
        review=job.review,
    )


def _write_picture(stack: ImageStack, masks: np.ndarray, out_dir: Path) -> Path:
    if not stack.is_volume:
        return write_png(out_dir / f"{stack.name}_overlay.png", overlay(stack.frames[0], masks[0]))
    picked = np.unique(np.linspace(0, len(masks) - 1, min(16, len(masks))).round().astype(int))
    tiles = [overlay(stack.frames[i], masks[i]) for i in picked]
    return write_png(out_dir / f"{stack.name}_montage.png", montage(tiles))


def write_csv(path: Path, results: Sequence[FileResult]) -> Path:
    """One row per file (``CSV_COLUMNS``), written atomically."""
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    table.writeheader()
    for result in results:
        table.writerow(result.csv_row())
    return write_text(path, buffer.getvalue())
