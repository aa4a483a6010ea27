"""SPPG: the self-patch prompt generator (paper-notes §3).

A patch decoder predicts one logit per 32x32-pixel patch from the image embedding; its thresholded,
detached map is upsampled to the embedding grid and embedded as a dense prompt that is added to the
image embedding. No points or boxes are needed, and the patch decoder learns only from its own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from espmedsam.models.common import LayerNorm2d


class SelfPatchPromptGenerator(nn.Module):
    """Patch decoder + dense prompter; keys ``patch_decoder.*`` and ``dense_prompter.*`` as upstream."""

    def __init__(self, embed_dim: int = 256, hidden_dim: int = 64, *, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.patch_decoder = nn.Sequential(
            nn.Conv2d(embed_dim, hidden_dim, kernel_size=2, stride=2),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, 1, kernel_size=1),
        )
        self.dense_prompter = nn.Sequential(
            nn.Conv2d(1, embed_dim, kernel_size=1), LayerNorm2d(embed_dim), nn.GELU()
        )

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch logits and dense prompt.

        Args:
            embeddings: (B, C, h, w) image embedding, h and w even.
        Returns:
            patch_logits (B, 1, h/2, w/2) and dense_prompt (B, C, h, w).
        """
        patch_logits = self.patch_decoder(embeddings)
        # the threshold is taken on the sigmoid, as upstream: logits in (-1.8e-7, 0) round to 0.5 and count
        patches = (torch.sigmoid(patch_logits.detach().float()) >= self.threshold).to(embeddings.dtype)
        patches = F.interpolate(patches, size=embeddings.shape[-2:], mode="nearest")
        return patch_logits, self.dense_prompter(patches)
