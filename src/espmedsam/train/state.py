"""Trainer state on disk: atomic writes, and every RNG state as plain tensors/lists/ints.

``state.pt`` is written with ``torch.save`` to a temporary name and renamed, and read back with
``torch.load(weights_only=True)``: it holds only tensors, dicts, lists, strings and numbers.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from espmedsam.errors import CheckpointError
from espmedsam.files import atomic_write

STATE_VERSION = 1


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` the trainer state atomically."""
    return atomic_write(path, lambda file: torch.save({"version": STATE_VERSION, **state}, file))


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state written by :func:`save_state` (never unpickles arbitrary objects).

    Raises:
        CheckpointError: a missing or unreadable file, or another state version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot read trainer state {path}: {error}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not an espmedsam trainer state of version {STATE_VERSION}")
    return state


def rng_state() -> dict[str, Any]:
    """The global torch, numpy and python ``random`` states, as tensors, lists and numbers."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global torch, numpy and python ``random`` states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
