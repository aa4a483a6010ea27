"""Inference on arrays: ``Predictor`` loads a model once and segments many images, batches and volumes.

Two backends run the network: torch (fp32 or bfloat16 autocast, CPU or GPU) and ONNX Runtime (an
``espmedsam export --format onnx`` file). Pre- and post-processing are the model's own (``RawImageIO``)
in both, so they give the same masks up to float rounding. Files, folders and volumes on disk are
``espmedsam.predict_files``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from espmedsam.config import QualityConfig
from espmedsam.device import resolve_device
from espmedsam.errors import InputError
from espmedsam.memory import release_freed_memory
from espmedsam.modalities import modality_ids
from espmedsam.models.espmedsam import ESPMedSAM, ESPOutput, ModalityLike
from espmedsam.models.image_io import PreprocessMeta, RawImageIO
from espmedsam.models.quality import DEFAULT_REVIEW_BELOW
from espmedsam.models.self_prompt import SelfPrompts, refined_logits, self_prompts
from espmedsam.prompting import Prompts

if TYPE_CHECKING:
    from espmedsam.config import ModelConfig
    from espmedsam.interactive import PromptedMask, PromptPredictor
    from espmedsam.models.unet import UNetBaseline
    from espmedsam.onnx_backend import OnnxBackend
    from espmedsam.openvino_encoder import OpenVinoImageEncoder

EXAMPLES_DIR = Path(__file__).parent / "assets" / "examples"


@dataclass(frozen=True)
class MaskWithPatchMap:
    """One image's mask and SPPG patch map, both at the image's own size."""

    mask: np.ndarray  # (H, W) bool
    patch_map: np.ndarray | None  # (H, W) float32 patch probabilities; None: the network has no SPPG
    quality: float | None = None  # the predicted Dice (``models/quality.py``); None: not calibrated


@dataclass(frozen=True)
class SelfPromptedMask:
    """One image's prompt-free and self-prompted masks, and the quality features of the first."""

    mask: np.ndarray  # (H, W) bool, prompt-free
    refined: np.ndarray  # (H, W) bool, its largest components replaced by their boxes' masks
    features: torch.Tensor  # (F,)


@dataclass(frozen=True)
class SelfPromptPass:
    """What the self-prompting pass over a batch gives, at the model input's size, on the CPU."""

    free: torch.Tensor  # (B, 1, S, S) prompt-free logits
    logits: torch.Tensor  # (B, 1, S, S) the same, refined on the images asked for
    patches: torch.Tensor  # (B, 1, g, g) SPPG patch logits
    features: torch.Tensor | None  # (B, F) quality features, when asked for and the model has a score
    ids: torch.Tensor  # (B,) modality ids


@dataclass(frozen=True)
class ModalityGuess:
    """The classifier's answer for one image (or one volume).

    ``known`` is False when the image is far from every modality's feature statistics (``distance``, to
    the closest one, over ``threshold``): it is likely none of the model's modalities. Without statistics
    (older checkpoints, ONNX files) nothing is checked: ``known`` True, ``distance`` None.
    """

    modality: str
    probability: float  # of ``modality``
    probabilities: dict[str, float]  # every modality's
    known: bool = True
    distance: float | None = None  # to the closest modality's statistics (a volume: its slices' mean)
    threshold: float | None = None  # the checkpoint's unknown threshold


class ConfigImageIO(RawImageIO):
    """The model's pre- and post-processing from its config alone (for backends that are not a module)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.size_multiple = config.size_multiple
        self.pixel_mean = torch.tensor(config.pixel_mean).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(config.pixel_std).view(1, 3, 1, 1)


class Predictor:
    """Runs a model on raw images of any size; inference mode and autocast live here, not in the model.

    Args:
        model: an ESP-MedSAM or U-Net model (torch backend), or an ``OnnxBackend``.
        device: torch backend only: "auto", "cpu", "cuda" or "cuda:N".
        size: one input side for every modality; None: each modality's from the model's config.
        bfloat16: torch backend only: bfloat16 autocast (about 2x faster on CPU, Dice within 0.005).
        batch_size: images per forward pass in ``predict_many``; same-size inputs share a batch.
        max_batch_pixels: a batch holds at most this many input pixels (B x S x S), so large inputs run
            in smaller batches: activations grow with B x S x S, and at 512² one image already needs
            hundreds of MB.
        refine: let the model prompt itself (``models/self_prompt.py``) on the modalities where the
            checkpoint's validation says it helps (``refined_modalities``); elsewhere, and without it,
            the masks are the prompt-free ones.

    Example:
        >>> predictor = Predictor(espmedsam.load_model("model.safetensors"))   # doctest: +SKIP
        >>> mask = predictor.predict(image, "dermoscopy")          # (H, W) bool
        >>> masks = predictor.predict_volume(volume, "xray")       # (N, H, W) bool
        >>> predictor.classify(image).modality                     # "dermoscopy"
    """

    def __init__(
        self,
        model: ESPMedSAM | UNetBaseline | OnnxBackend,
        *,
        device: str = "auto",
        size: int | None = None,
        bfloat16: bool = True,
        batch_size: int = 8,
        max_batch_pixels: int = 8 * 224 * 224,
        refine: bool = False,
    ) -> None:
        if isinstance(model, torch.nn.Module):
            self.device = resolve_device(device)
            self.model = model.to(self.device).eval()
            self.io: RawImageIO = self.model
        else:
            self.device = torch.device("cpu")
            self.model = model
            self.io = ConfigImageIO(model.config)
            size = size or model.fixed_size
        self.size = size
        self.bfloat16 = bfloat16
        self.batch_size = max(1, batch_size)
        self.max_batch_pixels = max_batch_pixels
        self.refine = refine
        self._prompter: PromptPredictor | None = None  # made at the first prompt; keeps its embedding

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.io.modalities

    @property
    def has_classifier(self) -> bool:
        return getattr(self.model, "classifier", None) is not None or bool(
            getattr(self.model, "has_classifier", False)
        )

    def input_size(self, modality: ModalityLike) -> int:
        """The model input side for one image of ``modality``: ``size``, else the model's choice."""
        return self.size or self.io.input_size(modality)

    def predict_logits(self, image: np.ndarray, modality: ModalityLike) -> np.ndarray:
        """(H, W[, C]) uint8 image -> (H, W) float32 mask logits at the image's own size (self-prompted on a
        ``refined_modalities`` one)."""
        if self._name(modality) in self.refined_modalities:
            return self._one_self_prompted(image, modality, score=False)[0]
        x, meta = self.io.preprocess(image, self.input_size(modality))
        ids = self._ids(modality, 1)
        return self.io.postprocess(self._segment(x, ids), meta)[0, 0].cpu().numpy()

    def predict_logits_with_quality(
        self, image: np.ndarray, modality: ModalityLike
    ) -> tuple[np.ndarray, float | None]:
        """As ``predict_logits`` (the same logits), and the mask's predicted Dice when ``has_quality``."""
        if not self.has_quality:
            return self.predict_logits(image, modality), None
        return self._one_self_prompted(image, modality, score=True)

    @property
    def refined_modalities(self) -> frozenset[str]:
        """The modalities whose masks the model refines by prompting itself: with ``refine``, those the
        checkpoint's calibration found it helps on (``espmedsam quality calibrate``)."""
        model = self.model
        if not self.refine or not isinstance(model, ESPMedSAM) or model.prompt_decoder is None:
            return frozenset()
        return frozenset(model.config.quality.refine_modalities)

    def predict(
        self,
        image: np.ndarray,
        modality: ModalityLike,
        *,
        boxes=None,
        points=None,
        labels=None,
    ) -> np.ndarray:
        """(H, W[, C]) uint8 image -> (H, W) bool mask (logit > 0, i.e. probability > 0.5).

        Without prompts the mask is prompt-free. ``boxes`` (K, 4) (x0, y0, x1, y1), ``points`` (P, 2)
        (x, y) and ``labels`` (P,) (1 foreground, the default; 0 background), in the image's pixels, go
        through the promptable decoder instead (``predict_prompted``).

        Raises:
            InputError: a malformed prompt, one outside the image, or prompts for a model without a
                promptable decoder.
        """
        prompts = Prompts.of(boxes, points, labels)
        if not prompts:
            return self.predict_logits(image, modality) > 0
        return self.predict_prompted(image, modality, prompts).mask

    def predict_prompted(self, image: np.ndarray, modality: ModalityLike, prompts: Prompts) -> PromptedMask:
        """The mask of boxes and clicks on ``image`` and each decoder pass's predicted IoU
        (``interactive.PromptPredictor.predict``; the image is embedded once for all its corrections)."""
        return self.prompter.predict(image, modality, prompts)

    @property
    def prompter(self) -> PromptPredictor:
        """The prompt path (``interactive.PromptPredictor``), which keeps the last image's embedding: for
        that image's prompt-free mask, quality score and corrections, the encoder runs once."""
        if self._prompter is None:
            from espmedsam.interactive import PromptPredictor

            self._prompter = PromptPredictor(self)
        return self._prompter

    def autocast(self):
        """The torch backend's autocast context: bfloat16 unless ``bfloat16`` is off."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    def predict_many(self, images: Sequence[np.ndarray], modality: str | Sequence[str]) -> list[np.ndarray]:
        """Images of any sizes -> one (H, W) bool mask each; inputs of one size share batches of up to
        ``batch_size`` images and ``max_batch_pixels`` input pixels.

        ``modality`` is one name for all images or one per image.
        """
        return [result.mask for result in self._predict_batches(images, modality, patch_maps=False)]

    def predict_with_patch_maps(
        self, images: Sequence[np.ndarray], modality: str | Sequence[str], *, quality: bool = False
    ) -> list[MaskWithPatchMap]:
        """As ``predict_many`` (the same masks), with each image's SPPG patch probabilities beside it and,
        with ``quality`` and a calibrated quality score (``has_quality``), each mask's predicted Dice."""
        return self._predict_batches(images, modality, patch_maps=True, quality=quality)

    def predict_with_quality(
        self,
        images: Sequence[np.ndarray],
        modality: str | Sequence[str],
        scored: Sequence[bool] | None = None,
    ) -> list[MaskWithPatchMap]:
        """As ``predict_many`` (the same masks), each with its predicted Dice when ``has_quality`` and its
        ``scored`` entry (default: every image) is True; no patch maps."""
        return self._predict_batches(images, modality, patch_maps=False, quality=scored or True)

    @property
    def review_below(self) -> float:
        """Masks whose predicted Dice is below this are flagged for review."""
        quality = getattr(self.model, "quality", None)
        return DEFAULT_REVIEW_BELOW if quality is None else float(quality.review_below)

    @property
    def has_quality(self) -> bool:
        """Whether masks get a quality score: the torch backend and a calibrated ``MaskQuality``."""
        quality = getattr(self.model, "quality", None)
        return quality is not None and quality.is_calibrated

    def quality_features(self, image: np.ndarray, modality: ModalityLike) -> SelfPromptedMask:
        """One image -> its prompt-free and self-prompted (H, W) bool masks and its (F,) quality features:
        what calibration fits the score on and chooses the refined modalities by."""
        name = self._name(modality)
        x, meta = self.io.preprocess(image, self.input_size(name))
        passed = self._self_prompt_pass(x, self._ids([name], 1), [meta.resized_size], refine=[0], score=True)
        free, refined = (self.io.postprocess(t, meta)[0, 0].numpy() > 0 for t in (passed.free, passed.logits))
        return SelfPromptedMask(free, refined, passed.features[0])  # type: ignore[index]

    def _one_self_prompted(
        self, image: np.ndarray, modality: ModalityLike, *, score: bool
    ) -> tuple[np.ndarray, float | None]:
        """One image through the self-prompting pass -> its (H, W) logits (refined if its modality is)
        and its predicted Dice (``score``)."""
        name = self._name(modality)
        x, meta = self.io.preprocess(image, self.input_size(name))
        refine = [0] if name in self.refined_modalities else []
        passed = self._self_prompt_pass(
            x, self._ids([name], 1), [meta.resized_size], refine=refine, score=score
        )
        scores = self._scores(passed, 1)
        return self.io.postprocess(passed.logits, meta)[0, 0].numpy(), scores[0]

    def _name(self, modality: ModalityLike) -> str:
        return self.modalities[int(self._ids(modality, 1)[0])]

    def _predict_batches(
        self,
        images: Sequence[np.ndarray],
        modality: str | Sequence[str],
        patch_maps: bool,
        quality: bool | Sequence[bool] = False,
    ) -> list[MaskWithPatchMap]:
        names = [modality] * len(images) if isinstance(modality, str) else list(modality)
        scored = [quality] * len(images) if isinstance(quality, bool) else list(quality)
        if len(names) != len(images):
            raise InputError(f"{len(images)} images but {len(names)} modalities")
        results: list[MaskWithPatchMap | None] = [None] * len(images)
        by_size: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            by_size.setdefault(self.input_size(name), []).append(i)
        for size, members in by_size.items():
            step = max(1, min(self.batch_size, self.max_batch_pixels // (size * size)))
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                batch = self._segment_batch(
                    [images[i] for i in chunk],
                    size,
                    [names[i] for i in chunk],
                    patch_maps,
                    any(scored[i] for i in chunk),
                )
                for i, result in zip(chunk, batch, strict=True):
                    results[i] = result if scored[i] else dataclasses.replace(result, quality=None)
        return results  # type: ignore[return-value]

    def predict_volume(self, frames: np.ndarray, modality: str) -> np.ndarray:
        """(N, H, W[, 3]) uint8 slices -> (N, H, W) bool masks, slice by slice in batches."""
        if frames.ndim not in (3, 4):
            raise InputError(f"a volume must be (N, H, W) or (N, H, W, 3), got shape {frames.shape}")
        return np.stack(self.predict_many(list(frames), modality))

    @property
    def unknown_threshold(self) -> float | None:
        """The distance over which ``classify`` calls an image unknown; None without statistics."""
        classifier = getattr(self.model, "classifier", None)
        if classifier is None or not getattr(classifier, "has_statistics", False):
            return None
        return float(classifier.unknown_threshold)

    def classify(self, image: np.ndarray | Sequence[np.ndarray]) -> ModalityGuess:
        """The modality of an (H, W[, C]) uint8 image, or of a volume from a list of its slices (their
        probabilities and distances averaged), and whether it looks like any modality at all.

        Raises:
            InputError: the model has no classifier.
        """
        if not self.has_classifier:
            raise InputError("this checkpoint has no modality classifier; pass the modality")
        images = [image] if isinstance(image, np.ndarray) and image.ndim in (2, 3) else list(image)
        x = torch.cat([self.io.classifier_input(i) for i in images])
        logits, distances = self._classify(x)
        probabilities = logits.softmax(-1).mean(0)
        best = int(probabilities.argmax())
        names = self.modalities
        threshold = self.unknown_threshold
        distance = None if distances is None else float(distances.mean())
        return ModalityGuess(
            names[best],
            float(probabilities[best]),
            {n: float(p) for n, p in zip(names, probabilities, strict=True)},
            known=distance is None or threshold is None or distance <= threshold,
            distance=distance,
            threshold=threshold,
        )

    def _ids(self, modality: ModalityLike, batch_size: int) -> torch.Tensor:
        return modality_ids(modality, self.modalities, batch_size=batch_size)

    def _segment_batch(
        self,
        images: Sequence[np.ndarray],
        size: int,
        names: Sequence[str],
        patch_maps: bool,
        quality: bool = False,
    ) -> list[MaskWithPatchMap]:
        """Same-size inputs in one forward pass -> one mask (and patch map, and quality) per image."""
        prepared = [self.io.preprocess(image, size) for image in images]
        x, ids = torch.cat([x for x, _ in prepared]), self._ids(list(names), len(names))
        scores: list[float | None] = [None] * len(images)
        score = quality and self.has_quality
        refine = [i for i, name in enumerate(names) if name in self.refined_modalities]
        if score or refine:
            sizes = [m.resized_size for _, m in prepared]
            passed = self._self_prompt_pass(x, ids, sizes, refine=refine, score=score)
            logits, patches, scores = passed.logits, passed.patches, self._scores(passed, len(images))
        else:
            logits, patches = self._forward(x, ids)
        results = []
        for i, (_, meta) in enumerate(prepared):
            mask = self.io.postprocess(logits[i : i + 1], meta)[0, 0].numpy() > 0
            patch_map = None
            if patch_maps and patches is not None:
                patch_map = self.patch_map(patches[i : i + 1], meta)
            results.append(MaskWithPatchMap(mask, patch_map, scores[i]))
        release_freed_memory()  # the forward's activations are freed: give their pages back
        return results

    def patch_map(self, patch_logits: torch.Tensor, meta: PreprocessMeta) -> np.ndarray:
        """(1, 1, g, g) SPPG patch logits of a preprocessed image -> (H, W) float32 patch probabilities
        at the image's own size."""
        size = meta.input_size
        # each patch logit covers its square of the padded input: map it back as the mask is
        square = F.interpolate(patch_logits.float().cpu(), size=(size, size), mode="nearest")
        return self.io.postprocess(square, meta)[0, 0].sigmoid().numpy()

    def _segment(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) inputs and (B,) ids -> (B, 1, S, S) float32 logits on the CPU."""
        return self._forward(x, ids)[0]

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) inputs and (B,) ids -> (B, 1, S, S) float32 mask logits and the (B, 1, g, g) SPPG
        patch logits (None for networks without SPPG), on the CPU."""
        if encoder := self._compiled_encoder():  # the masks alone: the embeddings stay as they come
            _, masks, patches = encoder.segment(x, ids)
            return masks, patches
        if isinstance(self.model, torch.nn.Module):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
                out = self.model(x.to(self.device), ids.to(self.device))
            patches = getattr(out, "patch_logits", None)
            return out.masks.float().cpu(), None if patches is None else patches.float().cpu()
        return torch.from_numpy(self.model.segment(x.numpy(), ids.numpy())), None

    def compiled_segment(
        self, x: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """With an OpenVINO-compiled encoder (``openvino_encoder``), whose graph also decodes the
        prompt-free masks: (B, C, h, w) embeddings, (B, 1, S, S) mask logits and (B, 1, g, g) patch
        logits of (B, 3, S, S) inputs and (B,) ids; None without one. The embeddings come as the torch
        encoder gives them under autocast, bfloat16 (under ``bfloat16``) and channels last: the promptable
        decoder after them then runs at the torch backend's speed (float32 embeddings, cast at each
        layer, and a channels-first layout made the quality score's decoder pass twice as slow)."""
        encoder = self._compiled_encoder()
        if encoder is None:
            return None
        embeddings, masks, patches = encoder.segment(x, ids)
        dtype = torch.bfloat16 if self.bfloat16 else embeddings.dtype
        return embeddings.to(dtype, memory_format=torch.channels_last), masks, patches

    def _compiled_encoder(self) -> OpenVinoImageEncoder | None:
        """The model's OpenVINO-compiled encoder (``openvino_encoder``), or None."""
        encoder = getattr(self.model, "image_encoder", None)
        return encoder if hasattr(encoder, "segment") else None

    @torch.inference_mode()
    def _self_prompt_pass(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        valid_sizes: Sequence[tuple[int, int]],
        *,
        refine: Sequence[int],
        score: bool,
    ) -> SelfPromptPass:
        """``_forward``'s operations (``encode`` then ``decode`` is ``forward``: the same masks), then the
        boxes of each mask's largest components through the promptable decoder, in one batch; the images
        ``refine`` names get their refined logits, and with ``score`` every image its quality features."""
        model = self.model
        if not isinstance(model, ESPMedSAM) or (model.prompt_decoder is None and model.quality is None):
            raise InputError(
                "self-prompting needs the torch backend and a promptable decoder or quality head"
            )
        x, ids = x.to(self.device), ids.to(self.device)
        with self.autocast():
            if compiled := self.compiled_segment(x, ids):
                embeddings, masks, patches = compiled
                out = ESPOutput(masks=masks, patch_logits=patches, embeddings=embeddings)
            else:
                embeddings = model.encode(x, ids)
                out = model.decode(embeddings, ids, x.shape[-1], x)
            prompts, features = self._box_pass(embeddings, out, valid_sizes, score)
        free = out.masks.float().cpu()
        logits = refined_logits(free, prompts, refine) if refine else free
        return SelfPromptPass(free, logits, out.patch_logits.float().cpu(), features, ids.cpu())

    def _box_pass(
        self, embeddings: torch.Tensor, out: ESPOutput, valid_sizes: Sequence[tuple[int, int]], score: bool
    ) -> tuple[SelfPrompts, torch.Tensor | None]:
        """The boxes of each prompt-free mask's largest components (``out.masks``, (B, 1, S, S)) through
        the promptable decoder on their (B, C, h, w) ``embeddings``, in one batch, and with ``score`` each
        image's quality features; run it under ``autocast``."""
        model = self.model
        assert isinstance(model, ESPMedSAM)
        limit = model.quality.max_components if model.quality is not None else QualityConfig().max_components
        size = out.masks.shape[-1]
        decode_boxes = None if model.prompt_decoder is None else model.box_decoder(embeddings, size)
        prompts = self_prompts(out.masks, valid_sizes, decode_boxes, limit)
        features = None
        if score and model.quality is not None:
            features = model.quality.features(out.masks, out.patch_logits, valid_sizes, prompts)
        return prompts, features

    @torch.inference_mode()
    def score_embedded(
        self, embeddings: torch.Tensor, out: ESPOutput, ids: torch.Tensor, valid_size: tuple[int, int]
    ) -> float | None:
        """The predicted Dice of one image's prompt-free mask from its (1, C, h, w) embedding and its
        decoded ``out`` (masks and patch logits), as ``predict_with_quality`` scores it; None without a
        calibrated score (``has_quality``)."""
        if not self.has_quality:
            return None
        with self.autocast():
            _, features = self._box_pass(embeddings, out, [valid_size], score=True)
        assert features is not None
        return float(self.model.quality(features, ids.cpu())[0])  # type: ignore[union-attr]

    def _scores(self, passed: SelfPromptPass, count: int) -> list[float | None]:
        """Each image's predicted Dice (of its prompt-free mask), or None without features."""
        if passed.features is None:
            return [None] * count
        return [float(v) for v in self.model.quality(passed.features, passed.ids)]  # type: ignore[union-attr]

    @torch.inference_mode()
    def _classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, s, s) classifier inputs -> (B, M) float32 logits and (B,) distances to the closest
        modality's statistics (None without statistics), on the CPU."""
        if not isinstance(self.model, torch.nn.Module):
            return torch.from_numpy(self.model.classify(x.numpy())), None
        classifier = self.model.classifier
        compiled = self._compiled_encoder()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
            if compiled is not None and compiled.has_classifier:  # its graph pools the features too
                features = compiled.classifier_features(x.to(self.device))
            else:
                features = classifier.pool(self.model.encode(x.to(self.device), None))  # float32
            logits = classifier.head(features)  # what ``model.classify`` computes
        if not classifier.has_statistics:
            return logits.float().cpu(), None
        return logits.float().cpu(), classifier.unknown_distance(features).cpu()
