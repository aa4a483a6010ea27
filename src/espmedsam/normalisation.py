"""Input normalisations of raw 0..255 RGB, by name (``ModelConfig.input_normalisation``).

- ``mean_std``: ``(x - mean) / std`` with per-channel statistics, as SAM and MobileSAM.
- ``minmax``: per-image min-max scaling to [0, 1] over all channels, as MedSAM and LiteMedSAM.

Both are applied to the resized, unpadded image; the padding added afterwards is 0 in either case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from espmedsam.errors import ConfigError

NORMALISATIONS: tuple[str, ...] = ("mean_std", "minmax")


def normalise(
    x: torch.Tensor, mode: str, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(B, 3, h, w) float on 0..255 -> normalised (B, 3, h, w); ``mean``/``std`` serve ``mean_std`` only.

    Raises:
        ConfigError: an unknown mode.
    """
    if mode == "mean_std":
        mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean_t) / std_t
    if mode == "minmax":
        low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        return (x - low) / (high - low).clamp_min(1e-8)
    raise ConfigError(f"input normalisation must be one of {', '.join(NORMALISATIONS)}, got {mode!r}")
