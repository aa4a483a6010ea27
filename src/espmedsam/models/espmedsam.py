"""ESPMedSAM: shared TinyViT + modality controllers -> SPPG -> QDMD (paper-notes §2-4).

``ESPMedSAM.forward`` reads like the paper's figure. Pre- and post-processing map a raw image of any size
to the model input (resize the long side, normalise, pad) and mask logits back to the original size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.config import ModelConfig
from espmedsam.errors import InputError
from espmedsam.modalities import modality_ids
from espmedsam.models.controller import ControllerRoute
from espmedsam.models.image_io import RawImageIO
from espmedsam.models.qdmd import QueryDecoupledDecoder
from espmedsam.models.sppg import SelfPatchPromptGenerator
from espmedsam.models.tinyvit import TinyViT

ModalityLike = torch.Tensor | Sequence[str | int] | str | int


@dataclass(frozen=True)
class ESPOutput:
    """What one forward pass returns."""

    masks: torch.Tensor  # (B, 1, S, S) mask logits of each image's own modality
    patch_logits: torch.Tensor  # (B, 1, S/32, S/32) SPPG patch logits
    embeddings: torch.Tensor  # (B, C, S/16, S/16) image embedding, before the dense prompt


class ESPMedSAM(RawImageIO, nn.Module):
    """The whole self-prompting model; ``config`` travels with every checkpoint."""

    def __init__(
        self,
        config: ModelConfig,
        image_encoder: TinyViT,
        sppg: SelfPatchPromptGenerator,
        decoder: QueryDecoupledDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.sppg = sppg
        self.decoder = decoder
        self.register_pixel_statistics(config.pixel_mean, config.pixel_std)

    def forward(self, images: torch.Tensor, modality: ModalityLike) -> ESPOutput:
        """Segment each image with its own modality's controller and decoding channel.

        Args:
            images: (B, 3, S, S) float32, normalised as ``config.pixel_mean/std`` say; S a multiple of 32.
            modality: (B,) int64 modality ids, a list of B names or ids, or one name for the whole batch.
        Returns:
            ESPOutput with masks (B, 1, S, S) logits, patch_logits (B, 1, S/32, S/32) and
            embeddings (B, 256, S/16, S/16).
        Raises:
            InputError: wrong image shape, or an unknown modality.
        """
        _check_images(images)
        ids = self.modality_ids(modality, images.shape[0]).to(images.device)
        embeddings = self.image_encoder(images, self.route(ids))
        patch_logits, dense_prompt = self.sppg(embeddings)
        low_res = self.decoder(embeddings + dense_prompt, ids)
        masks = F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return ESPOutput(masks=masks, patch_logits=patch_logits, embeddings=embeddings)

    def encode(self, images: torch.Tensor, modality: ModalityLike | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S/16, S/16) embedding; ``modality`` None uses no controller at all."""
        _check_images(images)
        if modality is None:
            return self.image_encoder(images, None)
        ids = self.modality_ids(modality, images.shape[0]).to(images.device)
        return self.image_encoder(images, self.route(ids))

    def modality_ids(self, modality: ModalityLike, batch_size: int) -> torch.Tensor:
        """(B,) int64 ids of ``modality`` in this model's modality list."""
        return modality_ids(modality, self.modalities, batch_size=batch_size)

    def route(self, ids: torch.Tensor) -> ControllerRoute:
        """Controller of each image: its modality's, or the single shared one of the official layout."""
        return ControllerRoute.from_index(torch.zeros_like(ids) if self.config.controller.shared else ids)

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write a native checkpoint (safetensors weights + JSON config); see ``espmedsam.load_model``."""
        from espmedsam.checkpoints.native import save_model

        return save_model(self, path, dtype=dtype)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a (B, 3, S, S) tensor, got {shape}")
    h, w = images.shape[-2:]
    if h % 32 or w % 32 or h == 0:
        raise InputError(f"image side must be a positive multiple of 32, got {h}x{w}")
