"""The six imaging modalities and their fixed ids (paper-notes §1, the official loader's order).

This module is the only place where the names are listed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from espmedsam.errors import InputError

MODALITIES: tuple[str, ...] = (
    "dermoscopy",
    "xray",
    "ultrasound",
    "fundus",
    "microscopy",
    "colonoscopy",
)


def modality_ids(
    modality: torch.Tensor | Sequence[str | int] | str | int,
    names: Sequence[str] = MODALITIES,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Turn modality names or ids into a (B,) int64 tensor of ids into ``names``.

    A single name or id is repeated ``batch_size`` times.

    Raises:
        InputError: an unknown name, an id out of range, or a length that differs from ``batch_size``.
    """
    if isinstance(modality, (str, int)):
        modality = [modality] * (batch_size or 1)
    if isinstance(modality, torch.Tensor):
        ids = modality.to(torch.int64).reshape(-1)
    else:
        ids = torch.tensor([_one_id(m, names) for m in modality], dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
        raise InputError(f"modality ids must lie in 0..{len(names) - 1}, got {ids.tolist()}")
    if batch_size is not None and ids.numel() != batch_size:
        raise InputError(f"got {ids.numel()} modalities for a batch of {batch_size} images")
    return ids


def _one_id(modality: str | int, names: Sequence[str]) -> int:
    if isinstance(modality, int):
        return modality
    key = str(modality).strip().lower()
    if key.isdigit():
        return int(key)
    if key not in names:
        raise InputError(f"unknown modality {modality!r}; expected one of {', '.join(names)}")
    return names.index(key)


NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # a modality added to a model


def check_modality_name(name: str) -> str:
    """Raises InputError unless ``name`` is a lower-case identifier (letters, digits, ``_``, ``-``)."""
    if not NAME_PATTERN.match(name):
        raise InputError(
            f"modality name {name!r} must start with a lower-case letter and hold only a-z, 0-9, _ or - "
            "(at most 32 characters)"
        )
    return name
