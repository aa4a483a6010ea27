"""Distillation teachers: SAM-architecture ViT image encoders (SAM ViT-B/L/H, MedSAM ViT-B).

A teacher is read from an official ``.pth`` (through ``import_sam``) or from the safetensors file that
``espmedsam import sam`` writes; its fingerprint (a hash of its weights) names its cache folder, so
embeddings of different teachers never mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from espmedsam.checkpoints.sam import import_sam, load_sam_encoder
from espmedsam.errors import CheckpointError
from espmedsam.models.sam_vit import SamViTEncoder

_SAFETENSORS_SUFFIX = ".safetensors"


def load_teacher(path: str | Path) -> SamViTEncoder:
    """The teacher encoder of a SAM/MedSAM checkpoint or an imported teacher file, in eval mode.

    Raises:
        CheckpointError: a missing file, or one that holds no SAM ViT image encoder (e.g. MobileSAM's
            TinyViT or an ESP-MedSAM checkpoint), saying so in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist or is not a file")
    try:
        teacher = load_sam_encoder(path) if path.suffix == _SAFETENSORS_SUFFIX else import_sam(path)
    except CheckpointError as error:
        raise CheckpointError(
            f"{path} is not a SAM ViT teacher (SAM ViT-B/L/H or MedSAM image encoder): {error}"
        ) from None
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def fingerprint(teacher: SamViTEncoder) -> str:
    """16 hex digits of SHA-256 over the teacher's config and weights (names, shapes, float32 bytes)."""
    digest = hashlib.sha256(repr(dataclasses.asdict(teacher.config)).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
