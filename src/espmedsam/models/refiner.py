"""Embedding refiner: a few residual ConvNeXt blocks between the image encoder and SPPG / QDMD.

Without a prompt, QDMD's image path is almost pixel-wise: with a single query token, the image-to-token
attention adds the same vector to every position, so each mask pixel is a near-linear read-out of the
embedding at that position. When the encoder is frozen (``frozen_encoder`` training on cached
embeddings) nothing else can mix neighbouring positions; the refiner does, at the embedding's resolution,
for a small fraction of the encoder's cost. Each block ends in a zero-initialised layer, so a fresh refiner
is the identity. ``depth`` 0 (the paper's layout) builds none.
"""

from __future__ import annotations

import torch
from torch import nn

from espmedsam.models.common import LayerNorm2d


class ConvNeXtBlock(nn.Module):
    """Depthwise k x k conv, channel LayerNorm, 1x1 expand, GELU, 1x1 project, residual: (B, C, h, w)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        nn.init.zeros_(self.pwconv2.weight)
        nn.init.zeros_(self.pwconv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class EmbeddingRefiner(nn.Sequential):
    """``depth`` ConvNeXt blocks on the (B, C, h, w) image embedding; the identity when fresh or empty."""

    def __init__(self, dim: int, depth: int = 0, kernel_size: int = 7, mlp_ratio: float = 2.0) -> None:
        super().__init__(*(ConvNeXtBlock(dim, kernel_size, mlp_ratio) for _ in range(depth)))
