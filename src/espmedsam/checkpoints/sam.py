"""Importer for SAM ViT-B/L/H and MedSAM ViT-B checkpoints: their ``image_encoder.*`` as a SamViTEncoder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from espmedsam.checkpoints.native import read_safetensors, write_safetensors
from espmedsam.checkpoints.torch_io import load_strict, read_torch_state_dict
from espmedsam.config import to_dict
from espmedsam.errors import CheckpointError
from espmedsam.models.sam_vit import SAM_VIT_VARIANTS, SamViTConfig, SamViTEncoder

PREFIX = "image_encoder."
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def import_sam(
    path: str | Path, *, variant: str | None = None, config: SamViTConfig | None = None
) -> SamViTEncoder:
    """The image encoder of a SAM or MedSAM checkpoint, in eval mode.

    Prompt-encoder and mask-decoder keys are ignored. The variant ("vit_b", "vit_l", "vit_h", "tiny")
    is inferred from the patch embedding width and the block count unless ``variant`` or ``config`` is
    given (``config`` wins).

    Raises:
        CheckpointError: unreadable file, no ``image_encoder.*`` keys, unknown layout, or any missing,
            unexpected or mis-shaped key (all listed in one message).
        ConfigError: ``variant`` is not a known name.
    """
    return sam_encoder_from_state(read_torch_state_dict(path), str(path), variant=variant, config=config)


def sam_encoder_from_state(
    state: dict[str, torch.Tensor],
    source: str,
    *,
    variant: str | None = None,
    config: SamViTConfig | None = None,
) -> SamViTEncoder:
    """The image encoder of an already-read SAM or MedSAM state dict; see :func:`import_sam`."""
    encoder_state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not encoder_state:
        raise CheckpointError(f"checkpoint {source} has no {PREFIX}* keys; it is not a SAM checkpoint")
    if config is None:
        config = SamViTConfig.from_variant(variant) if variant else infer_sam_config(encoder_state, source)
    model = SamViTEncoder(config)
    load_strict(model, encoder_state, source=f"{PREFIX}* of {source}")
    return model.eval()


def infer_sam_config(encoder_state: dict[str, torch.Tensor], source: str) -> SamViTConfig:
    """The known variant whose width and depth match an encoder state dict (keys without the prefix).

    Raises:
        CheckpointError: no patch embedding weight, or no known variant has this width and depth.
    """
    weight = encoder_state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointError(f"{source}: no 4-D patch_embed.proj.weight, cannot tell the SAM variant")
    width = weight.shape[0]
    depth = 1 + max((int(m.group(1)) for k in encoder_state if (m := _BLOCK_KEY.match(k))), default=-1)
    for factory in SAM_VIT_VARIANTS.values():
        candidate = factory()
        if (candidate.embed_dim, candidate.depth) == (width, depth):
            return candidate
    known = ", ".join(f"{name} ({f().embed_dim}, {f().depth})" for name, f in SAM_VIT_VARIANTS.items())
    raise CheckpointError(f"{source}: no SAM variant has width {width} and {depth} blocks; known: {known}")


SAM_ENCODER_FORMAT = "espmedsam-sam-encoder"


def save_sam_encoder(encoder: SamViTEncoder, path: str | Path) -> Path:
    """Write a teacher encoder as one safetensors file with its config in the metadata."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in encoder.state_dict().items()}
    metadata = {
        "format": SAM_ENCODER_FORMAT,
        "format_version": "1",
        "config": json.dumps(to_dict(encoder.config)),
    }
    return write_safetensors(path, tensors, metadata)


def load_sam_encoder(path: str | Path) -> SamViTEncoder:
    """Read a file written by ``save_sam_encoder`` (or ``espmedsam import sam``), in eval mode.

    Raises:
        CheckpointError: a missing or unreadable file, another format, or keys that do not fit.
    """
    config, tensors = read_safetensors(Path(path), SAM_ENCODER_FORMAT, SamViTConfig)
    encoder = SamViTEncoder(config)
    load_strict(encoder, tensors, str(path))
    return encoder.eval()
