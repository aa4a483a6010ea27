"""U-Net baseline: one MONAI ``BasicUNet`` for all modalities, trained by the same loop as ESP-MedSAM.

``UNetBaseline.forward(images, modality)`` has ESP-MedSAM's signature and returns ``UNetOutput`` with mask
logits only (no SPPG patch logits, so the loop drops the patch loss); ``modality`` is accepted and ignored.
Checkpoints are safetensors with format ``espmedsam-unet`` and the ``UNetConfig`` in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from espmedsam.config import IMAGENET_MEAN, IMAGENET_STD, check_inference_sizes, to_dict
from espmedsam.errors import InputError
from espmedsam.modalities import MODALITIES
from espmedsam.models.image_io import RawImageIO

UNET_FORMAT = "espmedsam-unet"


@dataclass(frozen=True)
class UNetConfig:
    """The baseline's features and input convention (same normalisation as ESP-MedSAM)."""

    name: str = "unet"
    features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)
    modalities: tuple[str, ...] = MODALITIES
    image_size: int = 256
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    inference_sizes: tuple[int, ...] = ()  # per modality; () = image_size for all (see ModelConfig)

    def __post_init__(self) -> None:
        check_inference_sizes(self.inference_sizes, self.modalities, 16)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)


@dataclass(frozen=True)
class UNetOutput:
    """Mask logits (B, 1, S, S); ``patch_logits`` is always None (no self-prompting)."""

    masks: torch.Tensor
    patch_logits: None = None


class UNetBaseline(RawImageIO, nn.Module):
    """2D MONAI BasicUNet, 3 input channels, 1 output logit channel; ``Predictor`` runs it like ESPMedSAM."""

    size_multiple = 16

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        if len(config.features) != 6:
            raise InputError(f"BasicUNet needs 6 features, got {list(config.features)}")
        self.config = config
        # imported here: MONAI's package import (about 2 s and 100 MB with what it pulls in) is paid by
        # the baseline alone, not by every command that can load a checkpoint
        from monai.networks.nets import BasicUNet

        self.unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=config.features)
        self.register_pixel_statistics(config.pixel_mean, config.pixel_std)

    def forward(self, images: torch.Tensor, modality: object = None) -> UNetOutput:
        """(B, 3, S, S) normalised images (S a multiple of 16) -> UNetOutput((B, 1, S, S) logits).

        Raises:
            InputError: not (B, 3, S, S) or S not a multiple of 16.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % 16 or images.shape[-2] % 16:
            raise InputError(
                f"images must be (B, 3, S, S) with S a multiple of 16, got {tuple(images.shape)}"
            )
        return UNetOutput(masks=self.unet(images))
