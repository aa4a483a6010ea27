"""ESPMedSAM: shared TinyViT + modality controllers -> SPPG -> QDMD (paper-notes §2-4).

``ESPMedSAM.forward`` reads like the paper's figure. Pre- and post-processing map a raw image of any size
to the model input (resize the long side, normalise, pad) and mask logits back to the original size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.config import ModelConfig
from espmedsam.errors import InputError
from espmedsam.modalities import modality_ids
from espmedsam.models.classifier import ModalityClassifier
from espmedsam.models.click_decoder import ClickDecoder
from espmedsam.models.controller import ControllerRoute, trace_safe_routing
from espmedsam.models.image_io import RawImageIO
from espmedsam.models.prompt_decoder import PromptDecoder, PromptedMasks
from espmedsam.models.qdmd import QueryDecoupledDecoder
from espmedsam.models.quality import MaskQuality
from espmedsam.models.refiner import EmbeddingRefiner
from espmedsam.models.self_prompt import BoxDecoder
from espmedsam.models.sppg import SelfPatchPromptGenerator
from espmedsam.models.tinyvit import TinyViT

BOX_PASS_PIXELS = 4 * 224 * 224  # output pixels of one promptable-decoder pass over several boxes

ModalityLike = torch.Tensor | Sequence[str | int] | str | int


@dataclass(frozen=True)
class ESPOutput:
    """What one forward pass returns."""

    masks: torch.Tensor  # (B, 1, S, S) mask logits of each image's own modality
    patch_logits: torch.Tensor  # (B, 1, S/2s, S/2s) SPPG patch logits, s the encoder's output stride
    embeddings: torch.Tensor  # (B, C, S/s, S/s) image embedding (after the refiner), before the dense prompt


class ESPMedSAM(RawImageIO, nn.Module):
    """The whole self-prompting model; ``config`` travels with every checkpoint."""

    def __init__(
        self,
        config: ModelConfig,
        image_encoder: TinyViT,
        sppg: SelfPatchPromptGenerator,
        decoder: QueryDecoupledDecoder,
        refiner: EmbeddingRefiner | None = None,
        classifier: ModalityClassifier | None = None,
        prompt_decoder: PromptDecoder | None = None,
        quality: MaskQuality | None = None,
        click_decoder: ClickDecoder | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.refiner = refiner if refiner is not None else EmbeddingRefiner(config.encoder.out_chans)
        self.sppg = sppg
        self.decoder = decoder
        self.classifier = classifier  # None: the modality must be given
        self.prompt_decoder = prompt_decoder  # None: prompt-free only
        self.quality = quality  # None: no quality score for the prompt-free masks
        self.click_decoder = click_decoder  # None: clicks steer the promptable decoder's boxes
        self.register_pixel_statistics(config.pixel_mean, config.pixel_std)

    def forward(self, images: torch.Tensor, modality: ModalityLike) -> ESPOutput:
        """Segment each image with its own modality's controller and decoding channel.

        Args:
            images: (B, 3, S, S) float32, normalised as ``config.input_normalisation`` says; S a multiple
                of ``config.size_multiple`` (32 with MobileSAM's stem, 8 with LiteMedSAM's).
            modality: (B,) int64 modality ids, a list of B names or ids, or one name for the whole batch.
        Returns:
            ESPOutput with masks (B, 1, S, S) logits, patch_logits (B, 1, S/2s, S/2s) and
            embeddings (B, 256, S/s, S/s), s = ``config.encoder.output_stride``.
        Raises:
            InputError: wrong image shape, or an unknown modality.
        """
        self._check_images(images)
        ids = self.modality_ids(modality, images.shape[0]).to(images.device)
        embeddings = self.image_encoder(images, self.route(ids))
        return self.decode(embeddings, ids, images.shape[-1], images)

    def forward_from_features(
        self, features: torch.Tensor, depth: int, images: torch.Tensor, modality: ModalityLike
    ) -> ESPOutput:
        """``forward`` from the output of the encoder's frozen prefix (``TinyViT.prefix(images, depth)``):
        training with a frozen, cached prefix calls this. ``images`` are the (B, 3, S, S) inputs."""
        ids = self.modality_ids(modality, features.shape[0]).to(features.device)
        embeddings = self.image_encoder.suffix(features, depth, self.route(ids))
        return self.decode(embeddings, ids, images.shape[-1], images)

    def decode(
        self,
        embeddings: torch.Tensor,
        modality: ModalityLike,
        size: int | None = None,
        images: torch.Tensor | None = None,
    ) -> ESPOutput:
        """SPPG and QDMD on (B, C, h, w) image embeddings -> ESPOutput with (B, 1, S, S) masks.

        ``size`` S defaults to h times the encoder's output stride. Training with a frozen encoder calls
        this on cached embeddings. ``images``, the (B, 3, S, S) inputs, feed the detail branch, if any.
        """
        ids = self.modality_ids(modality, embeddings.shape[0]).to(embeddings.device)
        size = size or embeddings.shape[-1] * self.config.encoder.output_stride
        embeddings = self.refiner(embeddings)
        patch_logits, dense_prompt = self.sppg(embeddings)
        low_res = self.decoder(embeddings + dense_prompt, ids, images)
        if low_res.shape[-1] != size:
            low_res = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
        return ESPOutput(masks=low_res, patch_logits=patch_logits, embeddings=embeddings)

    def decode_prompt(
        self,
        embeddings: torch.Tensor,
        size: int,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> PromptedMasks:
        """One prompt per image on (B, C, h, w) embeddings from ``encode`` (with the image's modality) ->
        PromptedMasks with (B, 1, S, S) mask logits and (B,) predicted IoU.

        Args:
            size: S, the model input's side; points (B, P, 2) and labels (B, P), 1 foreground and 0
                background, and boxes (B, 4) (x0, y0, x1, y1) are in its pixels.
        Raises:
            InputError: a model without a promptable decoder.
        """
        if self.prompt_decoder is None:
            raise InputError(
                "this checkpoint has no promptable decoder (espmedsam import litemedsam --into CKPT adds one)"
            )
        out = self.prompt_decoder(embeddings, self.decoder.pe_layer, size, points, labels, boxes)
        masks = out.masks
        if masks.shape[-1] != size:
            masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        return PromptedMasks(masks=masks, iou=out.iou)

    def decode_clicks(
        self,
        embeddings: torch.Tensor,
        size: int,
        points: torch.Tensor,
        labels: torch.Tensor,
        mask_logits: torch.Tensor,
    ) -> PromptedMasks:
        """Clicks correcting a mask, one per image, on (B, C, h, w) ``encode`` embeddings -> PromptedMasks
        with (B, 1, S, S) corrected logits and (B,) predicted IoU.

        Args:
            size: S, the model input's side; points (B, P, 2) and labels (B, P), 1 foreground, 0
                background, -1 none, are in its pixels; mask_logits (B, 1, S, S) of the mask so far.
        Raises:
            InputError: a model without a click decoder.
        """
        if self.click_decoder is None:
            raise InputError("this checkpoint has no click decoder (espmedsam prompts train-clicks adds one)")
        return self.click_decoder(embeddings, self.decoder.pe_layer, size, points, labels, mask_logits)

    def box_decoder(self, embeddings: torch.Tensor, size: int) -> BoxDecoder:
        """Boxes on the (B, C, h, w) ``encode`` embeddings of S = ``size`` inputs, each with the index of
        its image, -> their (N, 1, S, S) mask logits and (N,) predicted IoU, in decoder passes of at most
        ``BOX_PASS_PIXELS`` output pixels (each box's upscaled features and mask are S x S: at 512² three
        boxes in one pass held 270 MB more at once than one)."""
        chunk = max(1, BOX_PASS_PIXELS // (size * size))

        def decode(boxes: torch.Tensor, owners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            passes = [
                self.decode_prompt(embeddings[owners[i : i + chunk]], size, boxes=boxes[i : i + chunk])
                for i in range(0, max(len(boxes), 1), chunk)
            ]
            return torch.cat([out.masks for out in passes]), torch.cat([out.iou for out in passes])

        return decode

    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        return self.config.size_multiple

    def encode(self, images: torch.Tensor, modality: ModalityLike | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S/s, S/s) embedding; ``modality`` None uses no controller at all."""
        self._check_images(images)
        if modality is None:
            return self.image_encoder(images, None)
        ids = self.modality_ids(modality, images.shape[0]).to(images.device)
        return self.image_encoder(images, self.route(ids))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) classifier inputs (see ``classifier_input``) -> (B, M) modality logits.

        Raises:
            InputError: a model without a classifier, or a wrong image shape.
        """
        if self.classifier is None:
            raise InputError("this checkpoint has no modality classifier; pass the modality")
        return self.classifier(self.encode(images, None))

    def modality_ids(self, modality: ModalityLike, batch_size: int) -> torch.Tensor:
        """(B,) int64 ids of ``modality`` in this model's modality list; a tensor is not range-checked
        while exporting (the check reads its values)."""
        if isinstance(modality, torch.Tensor) and trace_safe_routing():
            return modality.to(torch.int64).reshape(-1)
        return modality_ids(modality, self.modalities, batch_size=batch_size)

    def route(self, ids: torch.Tensor) -> ControllerRoute | None:
        """Controller of each image: its modality's, the single shared one of the official layout, or none
        in a model without controllers. While exporting, the route gathers each image's controller
        parameters by its id instead of grouping the batch with Python ints (``ControllerRoute.gathered``)."""
        if not self.config.controller.enabled:
            return None
        index = torch.zeros_like(ids) if self.config.controller.shared else ids
        return ControllerRoute.gathered(index) if trace_safe_routing() else ControllerRoute.from_index(index)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images must be a (B, 3, S, S) tensor, got {shape}")
        h, w = images.shape[-2:]
        multiple = self.size_multiple
        if h % multiple or w % multiple or h == 0:
            raise InputError(f"image side must be a positive multiple of {multiple}, got {h}x{w}")
