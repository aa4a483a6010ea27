"""``--device auto|cpu|cuda``: where heavy commands run, and the autocast that goes with it."""

from __future__ import annotations

import contextlib

import torch

from espmedsam.errors import ConfigError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when one is present, else the CPU; ``cuda`` or ``cuda:N`` insist on one.

    Raises:
        ConfigError: an unknown name, or CUDA asked for where none is available.
    """
    base = name.split(":", 1)[0]
    if base not in DEVICES or (base != "cuda" and ":" in name):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` (CPU or CUDA) when ``enabled``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
