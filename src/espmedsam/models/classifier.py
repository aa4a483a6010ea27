"""The modality classifier: which of the model's modalities an image is, for ``--modality auto``.

It reads the controller-free encoder's embedding (controllers need the modality, so they cannot help find
it) through per-channel mean and standard deviation over all positions: what the image looks like
(colour, texture, contrast), not where things are. A two-layer MLP maps those statistics to logits.

With ``statistics_rank`` > 0 it also carries, per modality, a Gaussian of its normalised features (the
pooled features after ``norm``, what ``fc1`` reads): a mean, the ``statistics_rank`` principal directions
with their variances and one variance for every other direction (probabilistic PCA). They let a new
modality's class be fitted without the old modalities' images (``espmedsam add-modality``: samples of the
Gaussians, through ``fc1`` and GELU, stand in for them), and tell an image that is none of the
modalities: its Mahalanobis distance to every modality, each divided by that modality's typical distance
(``statistics_scale``), is over ``unknown_threshold`` for all of them.
"""

from __future__ import annotations

import torch
from torch import nn


class ModalityClassifier(nn.Module):
    """(B, C, h, w) controller-free image embedding -> (B, M) modality logits.

    Args:
        statistics_rank: principal directions kept per modality in the feature statistics; 0: none (the
            checkpoint then has no ``statistics_*`` buffers).
    """

    def __init__(
        self,
        embed_dim: int,
        num_modalities: int,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        *,
        statistics_rank: int = 0,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.fc1 = nn.Linear(2 * embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, num_modalities)
        self.statistics_rank = statistics_rank
        if statistics_rank:
            m, k, d = num_modalities, statistics_rank, 2 * embed_dim
            self.register_buffer("statistics_mean", torch.zeros(m, d))
            self.register_buffer("statistics_basis", torch.zeros(m, k, d))
            # logarithms: exact enough in a float16 checkpoint whatever the variances' magnitude
            self.register_buffer("statistics_log_variance", torch.zeros(m, k))
            self.register_buffer("statistics_log_residual", torch.zeros(m))
            self.register_buffer("statistics_scale", torch.ones(m))
            # features each modality's Gaussian was fitted on; 0: none yet, the modality is left out
            self.register_buffer("statistics_count", torch.zeros(m, dtype=torch.int64))
            self.register_buffer("unknown_threshold", torch.tensor(float("inf")))

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
        return self.fc2(self.dropout(self.hidden(features)))

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2C) pooled features -> (B, hidden_dim) hidden features, what ``fc2`` reads."""
        return self.lift(self.norm(features))

    def lift(self, normalised: torch.Tensor) -> torch.Tensor:
        """(B, 2C) normalised features (after ``norm``: the statistics' space) -> (B, hidden_dim)."""
        return self.act(self.fc1(normalised))

    @property
    def has_statistics(self) -> bool:
        return self.statistics_rank > 0

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2C) pooled features -> (B, M) float32 Mahalanobis distance of the normalised features to
        each modality's Gaussian, divided by that modality's ``statistics_scale``; infinite for a modality
        without statistics yet.

        Raises:
            RuntimeError: a classifier without statistics.
        """
        if not self.has_statistics:
            raise RuntimeError("this classifier has no feature statistics")
        with torch.autocast(features.device.type, enabled=False):
            distance = mahalanobis(
                self.norm(features.float()),
                self.statistics_mean,
                self.statistics_basis,
                self.statistics_log_variance.exp(),
                self.statistics_log_residual.exp(),
            )
        return (distance / self.statistics_scale).masked_fill(self.statistics_count == 0, float("inf"))

    def unknown_distance(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2C) pooled features -> (B,) the distance to the closest modality; over
        ``unknown_threshold``: none of the modalities."""
        return self.distances(features).min(dim=1).values


def mahalanobis(
    x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, variance: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """Distances of (B, D) points to M probabilistic-PCA Gaussians -> (B, M).

    Args:
        mean: (M, D); basis: (M, k, D) orthonormal principal directions; variance: (M, k) along them;
            residual: (M,) the variance along every direction orthogonal to the basis.
    """
    z = x[:, None, :] - mean[None]  # (B, M, D)
    along = torch.einsum("bmd,mkd->bmk", z, basis)  # (B, M, k)
    rest = z - torch.einsum("bmk,mkd->bmd", along, basis)
    squared = (along.square() / variance[None]).sum(-1) + rest.square().sum(-1) / residual[None]
    return squared.sqrt()
