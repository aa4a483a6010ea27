"""Raw image <-> model input, shared by every network that ``Predictor`` runs (ESP-MedSAM, the U-Net).

``preprocess`` resizes the long side to S, normalises and pads to S x S (SAM's convention);
``postprocess`` crops the padding off the logits and resizes them back to the raw image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from espmedsam.errors import InputError
from espmedsam.modalities import modality_ids
from espmedsam.normalisation import normalise


@dataclass(frozen=True)
class PreprocessMeta:
    """How a raw image was mapped to the model input, to map the logits back."""

    original_size: tuple[int, int]  # (H, W) of the raw image
    resized_size: tuple[int, int]  # (h, w) after resizing the long side to S
    input_size: int  # S, the padded square side


class RawImageIO:
    """Mixin for an ``nn.Module`` with ``pixel_mean``/``pixel_std`` (1, 3, 1, 1) buffers and a ``config``
    holding ``image_size`` and ``modalities``."""

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    size_multiple: int = 32

    def register_pixel_statistics(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Normalisation constants as non-persistent buffers: they follow ``.to(device)``, not checkpoints."""
        for name, values in (("pixel_mean", mean), ("pixel_std", std)):
            self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)  # type: ignore[attr-defined]

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities  # type: ignore[attr-defined]

    def input_size(self, modality: str | int | torch.Tensor) -> int:
        """The model input side S for images of one ``modality`` (name, id or one-element tensor): its
        ``config.inference_sizes`` entry (chosen on validation data, e.g. larger for thin fundus vessels),
        else ``config.image_size``."""
        config = self.config  # type: ignore[attr-defined]
        if not config.inference_sizes:
            return config.image_size
        return config.inference_sizes[int(modality_ids(modality, self.modalities, batch_size=1)[0])]

    def preprocess(
        self, image: np.ndarray | torch.Tensor, size: int | None = None
    ) -> tuple[torch.Tensor, PreprocessMeta]:
        """Raw image -> (1, 3, S, S) model input and the mapping back.

        Args:
            image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 (alpha is dropped, gray is repeated).
            size: S; defaults to ``config.image_size``.
        Raises:
            InputError: an array of another shape or dtype, or S not a multiple of ``size_multiple``.
        """
        size = size or self.config.image_size  # type: ignore[attr-defined]
        if size % self.size_multiple:
            raise InputError(f"input size must be a multiple of {self.size_multiple}, got {size}")
        rgb = to_rgb_tensor(image).to(self.pixel_mean.device)
        h, w = rgb.shape[-2:]
        scale = size / max(h, w)
        resized = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(rgb, size=resized, mode="bilinear", align_corners=False, antialias=scale < 1)
        mode = getattr(self.config, "input_normalisation", "mean_std")  # type: ignore[attr-defined]
        x = normalise(x, mode, self.pixel_mean, self.pixel_std)
        # padding comes after normalisation, so padded pixels read as 0 (the mean, for mean_std), as in SAM
        x = F.pad(x, (0, size - resized[1], 0, size - resized[0]))
        return x, PreprocessMeta(original_size=(h, w), resized_size=resized, input_size=size)

    def classifier_input(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw image -> (1, 3, s, s) input of the modality classifier: the whole image resized to a square
        of ``config.classifier.input_size`` (aspect ratio not kept, no padding), then normalised.

        Raises:
            InputError: as ``preprocess``.
        """
        side = self.config.classifier.input_size  # type: ignore[attr-defined]
        rgb = to_rgb_tensor(image).to(self.pixel_mean.device)
        shrink = side < max(rgb.shape[-2:])
        x = F.interpolate(rgb, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)
        mode = getattr(self.config, "input_normalisation", "mean_std")  # type: ignore[attr-defined]
        return normalise(x, mode, self.pixel_mean, self.pixel_std)

    def postprocess(self, logits: torch.Tensor, meta: PreprocessMeta) -> torch.Tensor:
        """(B, 1, S, S) logits -> (B, 1, H, W) logits at the raw image's size (crop the padding, resize)."""
        h, w = meta.resized_size
        cropped = logits[..., :h, :w].float()
        return F.interpolate(cropped, size=meta.original_size, mode="bilinear", align_corners=False)


def to_rgb_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
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
