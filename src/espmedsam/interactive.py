"""Boxes and clicks through the promptable decoder, on an image embedded once ("embed once, decode many", as
SAM's ``SamPredictor``): ``Predictor.predict(image, modality, boxes=..., points=..., labels=...)``.

Two ways a prompt makes a mask:

- **With boxes**, each box is one object: one decoder pass with the box and the clicks inside it. Clicks
  inside no box make one pass of their own. The mask is the union of the passes'; the prompt-free mask
  plays no part.
- **Clicks alone correct the prompt-free mask, one click after the other.** With a click decoder
  (``models/click_decoder.py``, trained with simulated clicks) each click is one pass of it, with every
  click so far and the mask so far; the masks after each prefix of the clicks are kept with the
  embedding, so the next click (or an undo) costs one pass at most. On the modalities the checkpoint
  chose on validation (``config.prompt.refit_clicked``), the object a foreground click corrected is then
  decoded again from its bounding box by the box decoder, which redraws a boundary the click grew past.
- Without one the box decoder (LiteMedSAM's) is used, which was trained with boxes, and point tokens
  alone mislead it, so a click steers boxes:
  - a foreground click inside an object's bounding box grows that box to take the click in; on nothing,
    square boxes of four sizes are tried around it and the mask with the highest predicted IoU that holds
    the click wins. Of that mask, the region the current mask lacks and the click is in is added;
  - a background click on an object decodes the object's box again, and the region the new mask drops
    and the click is in is removed (if it drops none there, nothing changes).
  Everything else keeps its pixels, so a click changes the error it is on and not the rest of the mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from espmedsam.errors import InputError
from espmedsam.models.espmedsam import ESPMedSAM, ESPOutput, ModalityLike
from espmedsam.models.image_io import PreprocessMeta
from espmedsam.models.self_prompt import refit_clicked
from espmedsam.prompting import FOREGROUND, PromptPass, Prompts, prompt_passes, to_model_input

if TYPE_CHECKING:
    from espmedsam.predict import Predictor

NO_PROMPT_DECODER = (
    "this checkpoint has no promptable decoder (espmedsam import litemedsam --into CKPT adds one)"
)


@dataclass
class ImageEmbedding:
    """One image encoded for prompting, reused by every correction of it."""

    inputs: torch.Tensor  # (1, 3, S, S) model input, on the model's device
    embeddings: torch.Tensor  # (1, C, h, w), the modality's controllers included
    modality: str
    meta: PreprocessMeta
    key: bytes  # the image's pixels, shape, modality and S, digested
    prompt_free: np.ndarray | None = field(default=None, repr=False)  # (H, W) bool, once decoded
    prompt_free_logits: torch.Tensor | None = field(default=None, repr=False)  # (1, 1, S, S)
    patch_logits: torch.Tensor | None = field(default=None, repr=False)  # (1, 1, g, g) SPPG's
    quality: float | None = field(default=None, repr=False)  # the prompt-free mask's, once scored
    scored: bool = field(default=False, repr=False)
    # the click decoder's (1, 1, S, S) logits and predicted IoU after each sequence of clicks so far
    corrections: dict[tuple, tuple[torch.Tensor, float]] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return self.meta.input_size


@dataclass(frozen=True)
class PromptedMask:
    """The mask of a prompt and the IoU head's estimate for each decoder pass it took."""

    mask: np.ndarray  # (H, W) bool
    iou: tuple[float, ...]  # one per pass (per click with a click decoder); () when no pass ran


class PromptPredictor:
    """The prompt path of a ``Predictor`` (torch backend, an ESP-MedSAM with a promptable decoder); keeps
    the last image's embedding, so each further correction of it costs decoder passes only."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.embedded: ImageEmbedding | None = None
        self.encoder_calls = 0  # images embedded so far (the embedding's reuse is visible in it)

    @property
    def model(self) -> ESPMedSAM:
        model = self.predictor.model
        if not isinstance(model, ESPMedSAM):
            raise InputError("prompts need the torch backend and an ESP-MedSAM checkpoint")
        if model.prompt_decoder is None:
            raise InputError(NO_PROMPT_DECODER)
        return model

    def embed(self, image: np.ndarray, modality: ModalityLike) -> ImageEmbedding:
        """The image's embedding: the kept one when it is the same image, modality and input size."""
        model, predictor = self.model, self.predictor
        size = predictor.input_size(modality)
        name = model.modalities[int(model.modality_ids(modality, 1)[0])]
        key = _embedding_key(image, name, size)
        if self.embedded is not None and self.embedded.key == key:
            return self.embedded
        x, meta = model.preprocess(image, size)
        x = x.to(predictor.device)
        logits = patches = None
        with torch.inference_mode(), predictor.autocast():
            # a compiled encoder's graph decodes the prompt-free mask as well
            if compiled := predictor.compiled_segment(x, model.modality_ids(name, 1).to(x.device)):
                embeddings, logits, patches = compiled
            else:
                embeddings = model.encode(x, name)
        self.encoder_calls += 1
        self.embedded = ImageEmbedding(x, embeddings, name, meta, key, prompt_free_logits=logits,
                                       patch_logits=patches)  # fmt: skip
        return self.embedded

    def prompt_free(self, embedded: ImageEmbedding) -> np.ndarray:
        """The prompt-free mask from the kept embedding: the same operations as ``Predictor.predict``."""
        if embedded.prompt_free is None:
            logits = self._decoded(embedded).prompt_free_logits
            assert logits is not None
            embedded.prompt_free = (
                self.model.postprocess(logits.float().cpu(), embedded.meta)[0, 0].numpy() > 0
            )
        return embedded.prompt_free

    def segment(self, image: np.ndarray, modality: ModalityLike) -> tuple[np.ndarray, np.ndarray | None]:
        """The prompt-free (H, W) bool mask and (H, W) SPPG patch map of ``image`` (None without SPPG), as
        ``Predictor.predict_with_patch_maps`` gives them; the image's embedding is kept, so its quality
        score (``quality``) and corrections do not run the encoder again."""
        embedded = self._decoded(self.embed(image, modality))
        patches = embedded.patch_logits
        patch_map = None if patches is None else self.predictor.patch_map(patches, embedded.meta)
        return self.prompt_free(embedded), patch_map

    def quality(self, image: np.ndarray, modality: ModalityLike) -> float | None:
        """The predicted Dice of ``image``'s prompt-free mask (``Predictor.predict_with_quality``'s), from
        its kept embedding when it is the last image embedded; None without a calibrated score."""
        embedded = self._decoded(self.embed(image, modality))
        if not embedded.scored:
            out = ESPOutput(embedded.prompt_free_logits, embedded.patch_logits, embedded.embeddings)  # type: ignore[arg-type]
            ids = self.model.modality_ids(embedded.modality, 1).to(embedded.inputs.device)
            embedded.quality = self.predictor.score_embedded(
                embedded.embeddings, out, ids, embedded.meta.resized_size
            )
            embedded.scored = True
        return embedded.quality

    def _decoded(self, embedded: ImageEmbedding) -> ImageEmbedding:
        """``embedded`` with its prompt-free logits and patch logits, decoded once from its embedding
        (``Predictor.predict``'s operations) unless the encoder's graph gave them."""
        if embedded.prompt_free_logits is None:
            model = self.model
            with torch.inference_mode(), self.predictor.autocast():
                ids = model.modality_ids(embedded.modality, 1).to(embedded.inputs.device)
                out = model.decode(embedded.embeddings, ids, embedded.size, embedded.inputs)
            embedded.prompt_free_logits = out.masks.float()
            embedded.patch_logits = out.patch_logits
        return embedded

    def predict(self, image: np.ndarray, modality: ModalityLike, prompts: Prompts) -> PromptedMask:
        """The mask of ``prompts`` on ``image`` (the module docstring says how).

        Raises:
            InputError: no prompt, one outside the image, or a model without a promptable decoder.
        """
        if not prompts:
            raise InputError("no prompt: give a box or a point")
        self.model  # noqa: B018  (says what is missing before anything runs)
        prompts.check_inside(*np.asarray(image).shape[:2])
        embedded = self.embed(image, modality)
        if prompts.boxes:
            mask = np.zeros(embedded.meta.original_size, dtype=bool)
            ious = []
            for prompt_pass in prompt_passes(prompts):
                proposal, iou = self._decode(embedded, prompt_pass)
                mask |= proposal
                ious.append(iou)
            return PromptedMask(mask, tuple(ious))
        return self._correct(embedded, prompts)

    def _correct(self, embedded: ImageEmbedding, clicks: Prompts) -> PromptedMask:
        """Clicks alone, in order: each a pass of the click decoder, else a local edit of the mask so far
        through the box decoder (module docstring)."""
        if self.model.click_decoder is not None:
            return self._correct_learned(embedded, clicks)
        mask = self.prompt_free(embedded).copy()
        ious = []
        for (x, y), label in zip(clicks.points, clicks.labels, strict=True):
            column, row = round(x), round(y)
            objects, _ = ndimage.label(mask)
            boxes = [_bounding_box(found) for found in ndimage.find_objects(objects)]
            holders = [box for box in boxes if _contains(box, x, y)]
            if label == FOREGROUND:
                candidates = (
                    [_grown(holders[0], x, y, mask.shape)] if holders else _boxes_around(x, y, mask.shape)
                )
                proposal = self._best_containing(embedded, candidates, row, column, ious)
                if proposal is not None:
                    _take_region(mask, proposal & ~mask, row, column, add=True)
            elif objects[row, column]:
                proposal, iou = self._decode(embedded, PromptPass(boxes[objects[row, column] - 1]))
                ious.append(iou)
                _take_region(mask, mask & ~proposal, row, column, add=False)
        return PromptedMask(mask, tuple(ious))

    def _correct_learned(self, embedded: ImageEmbedding, clicks: Prompts) -> PromptedMask:
        """Each click one click-decoder pass with the clicks so far and the mask so far (one IoU per
        click); the logits after each prefix of the clicks are kept, so only the clicks not seen before
        cost a pass."""
        model = self.model
        self.prompt_free(embedded)
        prompt = to_model_input(PromptPass(None, clicks.points, clicks.labels), embedded.meta)
        points, labels = prompt.points, prompt.labels
        assert points is not None and labels is not None and embedded.prompt_free_logits is not None
        device = embedded.inputs.device
        logits, ious = embedded.prompt_free_logits, []
        for k in range(1, len(clicks.points) + 1):
            key = (clicks.points[:k], clicks.labels[:k])
            if key not in embedded.corrections:
                with torch.inference_mode(), self.predictor.autocast():
                    so_far = points[:, :k].to(device), labels[:, :k].to(device)
                    out = model.decode_clicks(embedded.embeddings, embedded.size, *so_far, logits)
                    corrected = out.masks.float()
                    if (
                        clicks.labels[k - 1] == FOREGROUND
                        and embedded.modality in model.config.prompt.refit_clicked
                    ):
                        corrected = self._redrawn(embedded, corrected, points[0, k - 1])
                if len(embedded.corrections) >= MAX_KEPT_CORRECTIONS:
                    embedded.corrections.clear()
                embedded.corrections[key] = corrected, float(out.iou.float()[0])
            logits, iou = embedded.corrections[key]
            ious.append(iou)
        mask = model.postprocess(logits.cpu(), embedded.meta)[0, 0].numpy() > 0
        return PromptedMask(mask, tuple(ious))

    def _redrawn(self, embedded: ImageEmbedding, logits: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """(1, 1, S, S) ``logits`` with the object under a foreground click at model-input ``point`` (x, y)
        decoded again from its bounding box (``models/self_prompt.py``, ``refit_clicked``)."""
        x, y = (int(v) for v in point.round())
        decoder = self.model.box_decoder(embedded.embeddings, embedded.size)
        return refit_clicked(logits, embedded.meta.resized_size, x, y, decoder).to(logits.device)

    def _best_containing(
        self, embedded: ImageEmbedding, boxes: list, row: int, column: int, ious: list[float]
    ) -> np.ndarray | None:
        """Of the boxes' masks, the one with the highest predicted IoU that holds the click; None if none
        does. Each pass's IoU is appended to ``ious``."""
        best, best_iou = None, -np.inf
        for proposal, iou in self._decode_boxes(embedded, boxes):
            ious.append(iou)
            if proposal[row, column] and iou > best_iou:
                best, best_iou = proposal, iou
        return best

    def _decode_boxes(self, embedded: ImageEmbedding, boxes: list) -> list[tuple[np.ndarray, float]]:
        """Several boxes in one decoder pass (a batch: about half the time of one pass each on a CPU) ->
        each one's (H, W) bool mask and predicted IoU, as ``_decode`` gives them."""
        model = self.model
        prompts = [to_model_input(PromptPass(box), embedded.meta).boxes for box in boxes]
        device = embedded.inputs.device
        batch = torch.cat(prompts).to(device)  # type: ignore[arg-type]
        embeddings = embedded.embeddings.expand(len(boxes), -1, -1, -1)
        with torch.inference_mode(), self.predictor.autocast():
            out = model.decode_prompt(embeddings, embedded.size, boxes=batch)
        masks = model.postprocess(out.masks.float().cpu(), embedded.meta)[:, 0].numpy() > 0
        return [(mask, float(iou)) for mask, iou in zip(masks, out.iou.float().cpu(), strict=True)]

    def _decode(self, embedded: ImageEmbedding, prompt_pass: PromptPass) -> tuple[np.ndarray, float]:
        """One decoder pass -> its (H, W) bool mask and predicted IoU."""
        model = self.model
        prompt = to_model_input(prompt_pass, embedded.meta)
        device = embedded.inputs.device
        tensors = [None if t is None else t.to(device) for t in (prompt.points, prompt.labels, prompt.boxes)]
        with torch.inference_mode(), self.predictor.autocast():
            out = model.decode_prompt(embedded.embeddings, embedded.size, *tensors)
        mask = model.postprocess(out.masks.float().cpu(), embedded.meta)[0, 0].numpy() > 0
        return mask, float(out.iou.float()[0])


MAX_KEPT_CORRECTIONS = 64  # click sequences whose masks an embedding keeps (a page's undo and redo)

# half-sides of the boxes tried around a foreground click on nothing, as shares of the image's long side
CLICK_BOX_SCALES = (0.03, 0.06, 0.12, 0.25)


def _take_region(mask: np.ndarray, change: np.ndarray, row: int, column: int, *, add: bool) -> None:
    """Add (or remove) the connected region of ``change`` that holds the click, in place."""
    regions, _ = ndimage.label(change)
    if regions[row, column]:
        region = regions == regions[row, column]
        mask[region] = add


def _contains(box: tuple[float, float, float, float], x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _grown(box, x: float, y: float, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """An object's box grown to take in the click, with a margin of 5 % of its long side plus 2 px."""
    margin = 0.05 * max(box[2] - box[0], box[3] - box[1]) + 2
    return _clipped((min(box[0], x - margin), min(box[1], y - margin), max(box[2], x + margin),
                     max(box[3], y + margin)), shape)  # fmt: skip


def _boxes_around(x: float, y: float, shape: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Square boxes of several sizes centred on the click (``CLICK_BOX_SCALES``)."""
    side = max(shape)
    return [
        _clipped((x - s * side, y - s * side, x + s * side, y + s * side), shape) for s in CLICK_BOX_SCALES
    ]


def _clipped(box, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    height, width = shape
    return max(0.0, box[0]), max(0.0, box[1]), min(width - 1.0, box[2]), min(height - 1.0, box[3])


def _bounding_box(found: tuple[slice, slice]) -> tuple[float, float, float, float]:
    """A component's (rows, columns) slices -> its (x0, y0, x1, y1) box, corners inclusive."""
    rows, columns = found
    return float(columns.start), float(rows.start), float(columns.stop - 1), float(rows.stop - 1)


def _embedding_key(image: np.ndarray, modality: str, size: int) -> bytes:
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(f"{array.shape}{array.dtype}{modality}{size}".encode())
    return digest.digest()
