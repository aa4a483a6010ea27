"""One loaded model shared by every request: an upload in, masks, patch maps and their metadata out.

Requests run in the web server's worker threads; the model runs on one thread of its own, one pass at a
time (the model already uses every core, and a module is not promised to be re-entrant), while reading,
sniffing and encoding the answers of other requests go on beside it. One thread, not one lock: OpenMP's
thread pool belongs to the thread that calls into it, so every pass then meets the same warm pool rather
than whichever of the server's worker threads took the request.
"""

from __future__ import annotations

import base64
import io
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from espmedsam.data.stack import ImageStack, output_stem, read_stack, write_masks
from espmedsam.errors import EspMedSAMError, InputError
from espmedsam.predict import MaskWithPatchMap, Predictor
from espmedsam.predict_files import ModalityChoice, check_modality_option, choose_modality
from espmedsam.prompting import Prompts
from espmedsam.serve.uploads import (
    SniffedFormat,
    UploadLimits,
    UploadTooLarge,
    check_dimensions,
    saved_upload,
    sniff_format,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Segmentation:
    """What one upload gave: its frames, a mask and patch map per frame, and the mask file ``espmedsam
    predict`` would write for it (PNG for images, NIfTI for NIfTI and DICOM)."""

    name: str  # the display name of the upload
    format: str
    stack: ImageStack
    choice: ModalityChoice
    results: list[MaskWithPatchMap]
    masks: np.ndarray  # (N, H, W) bool, the results' masks
    mask_file: tuple[str, bytes]  # (suggested file name, contents)
    seconds: dict[str, float]  # read, classify, segment, total
    unknown_threshold: float | None = None  # the classifier's, when it has feature statistics
    review_below: float = 0.5  # masks whose predicted Dice is below it are flagged
    image_id: str | None = None  # a single image kept for corrections (``Segmenter.correct``)
    quality_pending: bool = False  # its quality score was left for ``Segmenter.quality``


@dataclass(frozen=True)
class KeptImage:
    """An uploaded single image, kept so that boxes and clicks can correct its mask."""

    name: str
    stack: ImageStack
    modality: str


@dataclass(frozen=True)
class QualityScore:
    """The quality score of a kept image's prompt-free mask."""

    image_id: str
    predicted_dice: float | None  # None: the model has no calibrated score
    review_below: float
    seconds: float


@dataclass(frozen=True)
class Correction:
    """The mask of the prompts on a kept image."""

    image_id: str
    mask: np.ndarray  # (H, W) bool
    predicted_iou: tuple[float, ...]  # one per decoder pass
    mask_file: tuple[str, bytes]
    seconds: float


# single images kept for corrections, the most recent first out of the way last: a page corrects the
# image it shows, and a few users at a time fit
KEPT_IMAGES = 16


class Segmenter:
    """Upload bytes -> ``Segmentation``, with the server's limits and temporary workspace."""

    def __init__(self, predictor: Predictor, workspace: Path, limits: UploadLimits | None = None) -> None:
        self.predictor = predictor
        self.workspace = Path(workspace)
        self.limits = limits or UploadLimits()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espmedsam-model")
        self._kept: OrderedDict[str, KeptImage] = OrderedDict()
        self._kept_lock = threading.Lock()

    def segment(
        self, data: bytes, name: str, modality: str = "auto", *, quality_later: bool = False
    ) -> Segmentation:
        """Segment one uploaded file (``name`` is for messages and the suggested file name only).

        A single image that takes prompts is embedded once for its mask, its quality score and its
        corrections; with ``quality_later`` its score is left for ``quality`` (about a third of the time
        at 512 px), so the mask comes back sooner.

        Raises:
            UploadTooLarge, UnsupportedFormat: over a limit; not a format the server reads.
            InputError: an unknown modality, or "auto" without a way to tell.
            EspMedSAMError: an unreadable file (messages name ``name``, never a server path).
        """
        start = time.perf_counter()
        self._check_modality(modality)
        try:
            if len(data) > self.limits.max_bytes:
                raise _too_large(len(data), self.limits.max_bytes)
            fmt = sniff_format(data)
            with saved_upload(data, fmt, self.workspace) as path:
                try:
                    stack = self._read(path, fmt)
                    read_done = time.perf_counter()
                    choice, classified, later, results = self._on_model_thread(
                        self._segment_stack, stack, modality, quality_later
                    )
                    segmented = time.perf_counter()
                    masks = np.stack([result.mask for result in results])
                    mask_file = _mask_file(stack, masks, path.parent, name)
                except EspMedSAMError as error:
                    raise type(error)(_renamed(str(error), path, name)) from None
        except EspMedSAMError as error:
            message = " ".join(str(error).split())
            raise type(error)(message if message.startswith(name) else f"{name}: {message}") from None
        seconds = {
            "read": read_done - start,
            "classify": classified - read_done,
            "segment": segmented - classified,
            "total": time.perf_counter() - start,
        }
        threshold = self.predictor.unknown_threshold
        image_id = self._keep(name, stack, choice.modality) if self.accepts_prompts(stack) else None
        pending = later and self.predictor.has_quality
        return Segmentation(
            name, fmt.name, stack, choice, results, masks, mask_file, seconds, threshold,
            self.predictor.review_below, image_id, pending,
        )  # fmt: skip

    def _segment_stack(
        self, stack: ImageStack, modality: str, quality_later: bool
    ) -> tuple[ModalityChoice, float, bool, list[MaskWithPatchMap]]:
        """On the model thread: the modality, when it was chosen, whether the score is left for later,
        and the frames' results."""
        choice = choose_modality(self.predictor, stack, modality)
        classified = time.perf_counter()
        later = quality_later and self._embeds(stack, choice.modality)
        return choice, classified, later, self._results(stack, choice.modality, score=not later)

    def _on_model_thread(self, function: Callable[..., T], *args) -> T:
        """``function(*args)`` on the model's thread, after the passes queued before it."""
        return self._model_thread.submit(function, *args).result()

    def _embeds(self, stack: ImageStack, modality: str) -> bool:
        """Whether the upload goes through the prompt path's kept embedding: a single image that takes
        prompts, of a modality the predictor does not refine (the prompt path gives prompt-free masks)."""
        return self.accepts_prompts(stack) and modality not in self.predictor.refined_modalities

    def _results(self, stack: ImageStack, modality: str, *, score: bool) -> list[MaskWithPatchMap]:
        """The frames' masks and patch maps; a single image's quality score with ``score`` (a volume's
        slices are not failures one by one)."""
        frames = list(stack.frames)
        if not self._embeds(stack, modality):
            return self.predictor.predict_with_patch_maps(frames, modality, quality=len(frames) == 1)
        prompter = self.predictor.prompter
        mask, patch_map = prompter.segment(frames[0], modality)
        return [MaskWithPatchMap(mask, patch_map, prompter.quality(frames[0], modality) if score else None)]

    def quality(self, image_id: str) -> QualityScore:
        """The quality score of a kept image's prompt-free mask (``segment(..., quality_later=True)`` left
        it): from its kept embedding while it is the last image segmented or corrected, else the image is
        embedded again.

        Raises:
            InputError: an unknown (or no longer kept) image.
        """
        start = time.perf_counter()
        kept = self._kept_image(image_id)
        score = self._on_model_thread(self.predictor.prompter.quality, kept.stack.frames[0], kept.modality)
        return QualityScore(image_id, score, self.predictor.review_below, time.perf_counter() - start)

    @property
    def prompts_enabled(self) -> bool:
        """Whether the model can take boxes and clicks: the torch backend with a promptable decoder."""
        return getattr(self.predictor.model, "prompt_decoder", None) is not None

    def accepts_prompts(self, stack: ImageStack) -> bool:
        return self.prompts_enabled and len(stack.frames) == 1

    def correct(self, image_id: str, prompts: Prompts) -> Correction:
        """The mask of ``prompts`` (boxes and clicks in the image's pixels) on a kept image; its embedding
        is reused while the same image is corrected.

        Raises:
            InputError: an unknown (or no longer kept) image, no prompt, a prompt outside the image.
        """
        start = time.perf_counter()
        kept = self._kept_image(image_id)
        result = self._on_model_thread(
            self.predictor.predict_prompted, kept.stack.frames[0], kept.modality, prompts
        )
        with tempfile.TemporaryDirectory(dir=self.workspace) as folder:
            mask_file = _mask_file(kept.stack, result.mask[None], Path(folder), kept.name)
        return Correction(image_id, result.mask, result.iou, mask_file, time.perf_counter() - start)

    def _kept_image(self, image_id: str) -> KeptImage:
        with self._kept_lock:
            kept = self._kept.get(image_id)
            if kept is not None:
                self._kept.move_to_end(image_id)
        if kept is None:
            raise InputError(
                f"no image {image_id!r} here (the last {KEPT_IMAGES} uploads are kept): upload it again"
            )
        return kept

    def _keep(self, name: str, stack: ImageStack, modality: str) -> str:
        image_id = uuid.uuid4().hex
        with self._kept_lock:
            self._kept[image_id] = KeptImage(name, stack, modality)
            while len(self._kept) > KEPT_IMAGES:
                self._kept.popitem(last=False)
        return image_id

    def _check_modality(self, modality: str) -> None:
        check_modality_option(self.predictor, modality)
        if modality == "auto" and not self.predictor.has_classifier:
            names = ", ".join(self.predictor.modalities)
            raise InputError(f"this model has no modality classifier: choose one of {names}")

    def _read(self, path: Path, fmt: SniffedFormat) -> ImageStack:
        check_dimensions(path, fmt, self.limits)
        stack = read_stack(path)
        frames = stack.frames
        self.limits.check_frames(len(frames), frames.shape[1], frames.shape[2])
        return stack


def _mask_file(stack: ImageStack, masks: np.ndarray, folder: Path, name: str) -> tuple[str, bytes]:
    """The mask file ``espmedsam predict`` writes, read back; named after the upload for the browser, as
    ``predict`` names it after the input file."""
    (written,) = write_masks(stack, masks, folder / "out")
    suffix = written.name[len(stack.name) :]  # "_mask.png", "_mask.nii.gz"
    return f"{output_stem(name, stack.kind) or 'upload'}{suffix}", written.read_bytes()


def _renamed(message: str, path: Path, name: str) -> str:
    """A reader's message about the temporary file, told about the uploaded one."""
    return message.replace(str(path), name).replace(str(path.parent), "upload")


def _too_large(size: int, cap: int) -> UploadTooLarge:
    return UploadTooLarge(f"upload of {size / 2**20:.2f} MB over this server's limit of {cap / 2**20:g} MB")


def png_base64(array: np.ndarray, compress_level: int = 1) -> str:
    """(H, W) or (H, W, 3) uint8 -> base64 PNG (fast compression: these are for display)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
