"""Reading foreign torch checkpoints safely and loading them strictly, shared by the importers."""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from espmedsam.errors import CheckpointError

logger = logging.getLogger(__name__)

NESTED_KEYS = ("model", "state_dict")
MAX_LISTED = 10


def read_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a torch checkpoint, read on the CPU without running code (``weights_only=True``).

    Accepts a raw state dict or one nested under ``"model"`` or ``"state_dict"``; other (non-tensor)
    entries are ignored.

    Raises:
        CheckpointError: the file is missing, is not a torch checkpoint (truncated, another format),
            needs code to unpickle, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: it is an empty file (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's wording: "Unsupported global: GLOBAL x.y" (< 2.10), "unsupported GLOBAL x.y whose ..."
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(error))
        if found:
            reason = f"it holds Python objects ({found.group(1)}) that would need code to load"
        else:
            reason = "it is not a torch checkpoint (corrupted or another format)"
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... on foreign bytes
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint, or truncated ({type(error).__name__})"
        ) from None
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    if len(tensors) < len(obj):
        logger.debug("%s: ignored %d non-tensor entries", path, len(obj) - len(tensors))
    return tensors


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` only if every key and shape matches.

    Raises:
        CheckpointError: one error listing the missing, unexpected and mis-shaped keys of ``source``.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        _listing(kind, names)
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if names
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def _listing(kind: str, names: list[str]) -> str:
    """'3 missing: a, b, c' with at most MAX_LISTED names and a count of the rest."""
    shown = ", ".join(names[:MAX_LISTED])
    rest = f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{len(names)} {kind}: {shown}{rest}"
