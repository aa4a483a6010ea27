"""The modality classifier: which of the model's modalities an image is, for ``--modality auto``.

It reads the controller-free encoder's embedding (controllers need the modality, so they cannot help find
it) through per-channel mean and standard deviation over all positions: what the image looks like
(colour, texture, contrast), not where things are. A two-layer MLP maps those statistics to logits.
"""

from __future__ import annotations

import torch
from torch import nn


class ModalityClassifier(nn.Module):
    """(B, C, h, w) controller-free image embedding -> (B, M) modality logits."""

    def __init__(self, embed_dim: int, num_modalities: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.fc1 = nn.Linear(2 * embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, num_modalities)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, M) logits."""
        return self.head(self.pool(embeddings))

    @staticmethod
    def pool(embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 2C) per-channel mean and standard deviation, in float32."""
        flat = embeddings.float().flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], dim=1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2C) pooled features -> (B, M) logits: what training on cached features calls."""
        return self.fc2(self.dropout(self.act(self.fc1(self.norm(features)))))
