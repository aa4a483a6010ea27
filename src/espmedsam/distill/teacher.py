"""Distillation teachers: SAM-architecture ViT image encoders (SAM ViT-B/L/H, MedSAM ViT-B) and TinyViT
image encoders (LiteMedSAM, MobileSAM).

A teacher is read from an official ``.pth`` (SAM as ``import_sam`` reads it; a checkpoint whose
``image_encoder.*`` is a TinyViT, by its stem: 1x1 for LiteMedSAM, 3x3 for MobileSAM) or from the
safetensors file that ``espmedsam import sam`` writes; its fingerprint (a hash of its weights) names its
cache folder, so embeddings of different teachers never mix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from espmedsam.checkpoints.importers import MOBILESAM_UNUSED
from espmedsam.checkpoints.sam import load_sam_encoder, sam_encoder_from_state
from espmedsam.checkpoints.torch_io import load_strict, read_torch_state_dict
from espmedsam.config import EncoderConfig
from espmedsam.distill.cache import weights_fingerprint
from espmedsam.errors import CheckpointError
from espmedsam.models.tinyvit import TinyViT

_SAFETENSORS_SUFFIX = ".safetensors"
TINYVIT_STEM = "image_encoder.patch_embed.seq.0.c.weight"  # a TinyViT's first stem convolution


class TinyViTTeacher(nn.Module):
    """A TinyViT image encoder used alone, without controllers: (B, 3, S, S) -> (B, 256, S/s, S/s)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = TinyViT(config, num_controllers=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, None)


def load_teacher(path: str | Path) -> nn.Module:
    """The teacher encoder of a SAM/MedSAM, LiteMedSAM or MobileSAM checkpoint or an imported teacher
    file, in eval mode.

    Raises:
        CheckpointError: a missing file, or one that holds no SAM ViT or TinyViT image encoder (e.g. an
            ESP-MedSAM checkpoint), saying so in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == _SAFETENSORS_SUFFIX:
            teacher = load_sam_encoder(path)
        else:
            state = read_torch_state_dict(path)
            read = tinyvit_teacher if TINYVIT_STEM in state else sam_encoder_from_state
            teacher = read(state, str(path))
    except CheckpointError as error:
        raise CheckpointError(
            f"{path} is not a teacher (SAM ViT-B/L/H, MedSAM, LiteMedSAM or MobileSAM image encoder): {error}"
        ) from None
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def tinyvit_teacher(state: dict[str, torch.Tensor], source: str) -> TinyViTTeacher:
    """The TinyViT of a checkpoint's ``image_encoder.*`` (LiteMedSAM's pointwise or MobileSAM's strided
    stem, told by the first stem convolution's kernel), loaded strictly.

    Raises:
        CheckpointError: keys or shapes that do not fit TinyViT-5M.
    """
    stem = "pointwise" if state[TINYVIT_STEM].shape[-1] == 1 else "strided"
    teacher = TinyViTTeacher(EncoderConfig(stem=stem, balanced_windows=False))
    encoder = {
        k[len("image_encoder.") :]: v
        for k, v in state.items()
        if k.startswith("image_encoder.") and not k.startswith(MOBILESAM_UNUSED)
    }
    load_strict(teacher.encoder, encoder, f"image_encoder.* of {source}")
    return teacher


def fingerprint(teacher: nn.Module) -> str:
    """16 hex digits of SHA-256 over the teacher's config and weights (names, shapes, float32 bytes)."""
    return weights_fingerprint(dataclasses.asdict(teacher.config), sorted(teacher.state_dict().items()))
