"""Detail branch: image-resolution features fused into QDMD's upscaled mask features.

QDMD reads each mask pixel out of features upscaled 4x from the image embedding, so nothing finer than an
embedding cell (4 px with LiteMedSAM's stem, 16 with MobileSAM's) reaches the mask: one-to-three-pixel
vessels blur away. As HQ-SAM adds early, high-resolution features to SAM's mask features, this branch runs
two small convolutions on the input image at the upscaled features' resolution and adds their output;
a fusion convolution then mixes detail with context before the hypernetwork's read-out. Both additions end
in zero-initialised layers, so a fresh branch leaves the decoder's output unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DetailBranch(nn.Module):
    """(B, 3, S, S) image and (B, C, S/r, S/r) upscaled features -> fused (B, C, S/r, S/r) features."""

    def __init__(self, out_dim: int, hidden_dim: int = 16, stride: int = 1) -> None:
        super().__init__()
        self.stride = (
            stride  # input pixels per upscaled-feature cell: 1 for LiteMedSAM's stem, 4 for MobileSAM's
        )
        self.image_convs = nn.Sequential(
            nn.Conv2d(3, hidden_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_dim, out_dim, 1),
        )
        self.fusion = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1), nn.GELU(), nn.Conv2d(out_dim, out_dim, 1)
        )
        for last in (self.image_convs[-1], self.fusion[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, images: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Fused features, the shape of ``upscaled``."""
        if self.stride > 1:
            images = F.avg_pool2d(images, self.stride)
        images = images.to(upscaled.dtype).contiguous(memory_format=torch.channels_last)  # faster on CPU
        x = upscaled + self.image_convs(images)
        return x + self.fusion(x)
