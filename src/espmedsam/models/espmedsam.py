"""ESPMedSAM: shared TinyViT + modality controllers -> SPPG -> QDMD (paper-notes §2-4).

``ESPMedSAM.forward`` reads like the paper's figure. Pre- and post-processing map a raw image of any size
to the model input (resize the long side, normalise, pad) and mask logits back to the original size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.config import ModelConfig
from espmedsam.errors import InputError
from espmedsam.modalities import modality_ids
from espmedsam.models.controller import ControllerRoute
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


@dataclass(frozen=True)
class PreprocessMeta:
    """How a raw image was mapped to the model input, to map the logits back."""

    original_size: tuple[int, int]  # (H, W) of the raw image
    resized_size: tuple[int, int]  # (h, w) after resizing the long side to S
    input_size: int  # S, the padded square side


class ESPMedSAM(nn.Module):
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
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

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

    def preprocess(
        self, image: np.ndarray | torch.Tensor, size: int | None = None
    ) -> tuple[torch.Tensor, PreprocessMeta]:
        """Raw image -> (1, 3, S, S) model input and the mapping back.

        Args:
            image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 (alpha is dropped, gray is repeated).
            size: S; defaults to ``config.image_size``.
        Raises:
            InputError: an array of another shape or dtype, or S not a multiple of 32.
        """
        size = size or self.config.image_size
        if size % 32:
            raise InputError(f"input size must be a multiple of 32, got {size}")
        rgb = _to_rgb_tensor(image).to(self.pixel_mean.device)
        h, w = rgb.shape[-2:]
        scale = size / max(h, w)
        resized = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(rgb, size=resized, mode="bilinear", align_corners=False, antialias=scale < 1)
        x = (x - self.pixel_mean) / self.pixel_std
        # padding comes after normalisation, so padded pixels read as the mean (zero), as in SAM
        x = F.pad(x, (0, size - resized[1], 0, size - resized[0]))
        return x, PreprocessMeta(original_size=(h, w), resized_size=resized, input_size=size)

    def postprocess(self, logits: torch.Tensor, meta: PreprocessMeta) -> torch.Tensor:
        """(B, 1, S, S) logits -> (B, 1, H, W) logits at the raw image's size (crop the padding, resize)."""
        h, w = meta.resized_size
        cropped = logits[..., :h, :w].float()
        return F.interpolate(cropped, size=meta.original_size, mode="bilinear", align_corners=False)

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


def _to_rgb_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W[, C]) uint8 -> (1, 3, H, W) float32 in 0..255."""
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"raw images must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"raw image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    rgb = (
        np.repeat(array, 3, axis=2) if array.shape[2] == 1 else np.array(array[..., :3])
    )  # own, writable copy
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
